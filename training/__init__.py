"""Training the compressor (`ccm-chat train-compressor`), apart from the chat's runtime.

Needs the train extra (torch, transformers, gguf, tqdm, chitchat-dataset): the chat never
imports this package. It builds on the runtime's compressor (`ccm_chat.engine.ccm`: the <COMP>
table, the conditional LoRA, the episode layouts) and never the other way round.

    data      the dialogues and recall probes it trains and validates on (torch-free)
    train     TrainConfig, the loss, the loop, resumable checkpoints
    parallel  data-parallel training under a launcher (torchrun, accelerate launch)
    evaluate  scoring replies under each kind of memory
    export    the LoRA as a llama.cpp GGUF adapter
    recipe    train_compressor: one run, and the files the app loads
"""
