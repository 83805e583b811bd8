"""Training: the trainer (`trainer`), the engines it runs on (`engine`; ZeRO in `forge_qat.distributed.zero`),
model setup shared by both (`model_setup`), optimisation (`optim`) and its config sections (`config`).

Callers import from the submodules; this package imports nothing, so `forge_qat.config` can compose the
sections in `train.config` without loading the trainer.
"""
