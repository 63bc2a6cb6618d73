"""ccm-chat's benchmarks, one door: `python -m bench list` shows them, `python -m bench run
NAME [args...]` runs one (the same as `python bench/NAME.py args...` or `bash
bench/NAME.sh args...`). Run both from the repository root: the scripts' default paths
(bench/results/...) are relative to it. bench/registry.py finds them; bench/machine.py's
write_result is the one way a benchmark writes its JSON."""
