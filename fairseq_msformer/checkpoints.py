"""Checkpoints that survive a kill (SIGKILL, preemption, the OOM killer) at any moment of their save.

fairseq writes the first file of a save (checkpoint_1_N.pt, checkpoint_best.pt, ...) atomically, to a temporary file
renamed into place, but makes the others, checkpoint_last.pt among them, with PathManager.copy, which on a local
disk truncates the old file and writes the new one in place. A kill during that copy leaves a truncated
checkpoint_last.pt, and the same command then stops with "PytorchStreamReader failed reading zip archive" instead of
resuming (tests/test_kill_resume.py shows it). Loading the plugin makes those copies atomic as well.
"""
import os
import shutil

from fairseq.file_io import PathManager


def install_atomic_checkpoint_copies():
    """Make fairseq's PathManager.copy write local files to a temporary name and rename them into place, so a file
    it replaces is always either the old one or the new one, whole. Remote paths (iopath handlers) keep fairseq's
    own copy."""
    fairseq_copy = PathManager.copy
    if getattr(fairseq_copy, "_msformer", False):
        return

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if PathManager.path_requires_pathmanager(dst_path):
            return fairseq_copy(src_path, dst_path, overwrite)
        partial = dst_path + ".tmp"  # the name fairseq's own atomic save uses
        shutil.copyfile(src_path, partial)
        os.replace(partial, dst_path)
        return True

    copy._msformer = True
    PathManager.copy = staticmethod(copy)
