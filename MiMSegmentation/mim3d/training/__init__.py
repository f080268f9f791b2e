"""Training runs: `mim3d pretrain` (pretrain.py; later `mim3d finetune`) on the shared engine.

- engine.py: optimiser groups, the learning-rate schedule, precision, `train_one_epoch`, `fit`, checkpoint state
- distributed.py: torchrun processes, device choice, and the deterministic sharding of each epoch
- run_writer.py: the run folder as it is written (status, metrics, TensorBoard, log, checkpoints) and stop requests
- options.py: the command-line options and their checks

The run-folder layout and the readers the Slicer panel uses are in the light module mim3d.runs.
"""
