"""Training runs: `mim3d pretrain` (pretrain.py) and `mim3d finetune` (finetune.py) on the shared engine.

- engine.py: optimiser groups, the learning-rate schedule, precision, `train_one_epoch`, `fit`, checkpoint state
- distributed.py: torchrun processes, device choice, and the deterministic sharding of each epoch
- lifecycle.py: the run folder's life, the same for both commands (create, stop requests, clean up or fail, finish)
- run_writer.py: the run folder as it is written (status, metrics, TensorBoard, log, checkpoints) and stop requests
- finetune_data.py, finetune_writer.py, validation.py: the labelled cases, validation records, Dice, model package

The options of both commands are the dataclasses of the light module mim3d.run_options; the run-folder layout and the
readers the Slicer panel uses are in the light module mim3d.runs.
"""
