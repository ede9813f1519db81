"""Scale projection to GPU clusters (`rlhf-bench project`, docs/projection.md).

presets.py    hardware, architectures, efficiencies, DeepSpeed-Chat's published rows (data)
counts.py     parameters, FLOP shapes (priced by bench/flops.py), activations, collective bytes
overlap.py    collectives with their latency; what ZeRO-3's fetches leave exposed
model.py      one configuration: memory per GPU, the largest batch, seconds per phase, a row
search.py     settings that do not fit (or fit a starved batch): the fastest that do, or what would
calibration.py  DeepSpeed-Chat's published hours beside the model's
measured.py   efficiencies a harness run measured (--efficiency)
cli.py        options, the printed table, --out CSV, --plot PNG (run_projection, main)
docs.py       regenerates docs/projection.md's tables and outputs from their commands
"""
