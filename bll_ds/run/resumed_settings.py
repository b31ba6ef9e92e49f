"""A resumed run trains with the DeepSpeed config it is launched with, not the one it was saved with.

torch's optimizer.load_state_dict restores every hyperparameter of every param group (lr, betas,
eps, weight_decay) from the checkpoint, so a resume with a lower learning rate or weight decay in
the config would silently keep the old ones, including after a non-finite stop whose advice is to
lower the learning rate. DeepSpeed's schedulers save only their iteration, so their shape (peak,
warm-up, decay) already comes from the config, but the lr of the first resumed step is the saved
one until the scheduler next steps.

So, around the load: the freshly built optimizer's groups (built from this launch's config,
including the groups whose weight decay the trainer fixes at 0: pipeline/build.py
weight_decay_groups) are kept, put back after the load, and the scheduler re-applies its
current iteration's lr under this config. Gradient clipping is read from the config by the engine,
so it takes effect without this. The moments (exp_avg, exp_avg_sq) and the step count stay the
checkpoint's: that is what resuming means.
"""

from __future__ import annotations

from contextlib import contextmanager


def optimizers_and_schedulers(engine) -> list:
    """(optimizer, scheduler or None) of every stage this process trains: the emulator's stages,
    or a launched DeepSpeed engine's one."""
    if hasattr(engine, "stages"):  # the one-process emulator (pipeline/emulated/emulator.py)
        return [(stage.optimizer, stage.scheduler) for stage in engine.stages]
    return [(engine.optimizer, engine.lr_scheduler)]


@contextmanager
def configured_hyperparameters_win(pairs):
    fresh = [[{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
             for optimizer, _ in pairs]
    yield
    for (optimizer, scheduler), groups in zip(pairs, fresh):
        for group, settings in zip(optimizer.param_groups, groups):
            group.update(settings)
        if scheduler is not None:
            scheduler.step(scheduler.last_batch_iteration)  # DeepSpeed's: this iteration's lr, under this config
