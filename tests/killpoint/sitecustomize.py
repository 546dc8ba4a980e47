"""Imported at start-up by a Python whose PYTHONPATH holds this folder (tests/test_run_folder.py's kill tests):
when EFFBERT_KILL_AT names a file of a checkpoint save (``checkpoint-2/optimizer.pt``), the process writes half of
that file and ends at once (``os._exit``, no cleanup), as a kill or a power cut during the save would leave it."""

import os

_TARGET = os.environ.get("EFFBERT_KILL_AT")


def _cut_if_target(path):
    if isinstance(path, (str, os.PathLike)) and os.fspath(path).replace(os.sep, "/").endswith(
        _TARGET
    ):
        os.truncate(path, os.path.getsize(path) // 2)
        os._exit(9)


if _TARGET:
    import safetensors.torch
    import torch

    def _wrap(save, path_arg):
        def wrapped(*args, **kwargs):
            save(*args, **kwargs)
            _cut_if_target(args[path_arg] if len(args) > path_arg else None)

        return wrapped

    torch.save = _wrap(torch.save, 1)  # optimizer.pt, scheduler.pt, rng_state.pth
    safetensors.torch.save_file = _wrap(
        safetensors.torch.save_file, 1
    )  # model.safetensors (bound by transformers)

    from transformers.trainer_callback import TrainerState

    TrainerState.save_to_json = _wrap(
        TrainerState.save_to_json, 1
    )  # trainer_state.json, written last
