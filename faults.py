"""What a long training run meets, and how train.py ends it cleanly: stop signals (Ctrl-C, a job scheduler's
SIGTERM) and disks too small for its checkpoints. Either way the run ends with one line that names the last
complete checkpoint; a checkpoint is never left half-written (checkpoint.save_checkpoint removes its .tmp).
"""
import os
import signal
import threading

from outputs import free_bytes, megabytes

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# optimizer state per parameter, in parameter-sized tensors: Adam's two moments, SGD's momentum
OPTIMIZER_COPIES = {"adamw": 2, "adam": 2, "sgd": 1}


class Stopped(Exception):
    """A stop signal ended training at (epoch, step)."""

    def __init__(self, signum, epoch=None, step=None, steps=None, at_once=False):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.epoch, self.step, self.steps, self.at_once = signum, epoch, step, steps, at_once
        self.exit_code = 128 + signum  # what a shell reports for a process killed by the signal: 130, 143

    def where(self):
        if self.at_once:  # a second signal: wherever the run was, mid-step or mid-write
            return f"epoch {self.epoch}, at once (a second signal; that epoch is not saved)"
        if self.step is None:
            return f"the end of epoch {self.epoch}"
        return f"epoch {self.epoch} step {self.step}/{self.steps}"


class StopSignals:
    """Within `with StopSignals(rank) as stop:` the first SIGINT or SIGTERM only sets stop.signum, and training
    stops at the next step (a checkpoint being written is finished first). A second one raises Stopped at once:
    a checkpoint being written is then abandoned, its .tmp removed, and the previous file kept."""

    def __init__(self, rank=0):
        self.rank, self.signum, self.previous = rank, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Stopped(signum, at_once=True)
        self.signum = signum
        if self.rank == 0:  # os.write, not print: a handler may interrupt a print, and print is not reentrant
            os.write(2, f"\n{signal.Signals(signum).name} received: stopping after this step "
                        f"(send it again to stop at once)\n".encode())


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn. Ctrl-C and a scheduler's SIGTERM reach the whole process group; the workers
    leave them to the main process, which shuts the workers down, instead of dying mid-batch with tracebacks."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def resume_note(saved, full_disk=False):
    """What is safe after a stop: saved = (path, epoch) of the last complete checkpoint, or None."""
    if saved is None:
        return "No checkpoint was completed yet: nothing to resume; start the run again" + \
            (" once space is freed" if full_disk else "")
    path, epoch = saved
    return (f"The last complete checkpoint is {path} (epoch {epoch}); nothing in it was lost. Continue with "
            f"`python train.py --resume {path}`" + (" once space is freed" if full_disk else ""))


def checkpoint_size_check(model, optimizer_name, output_dir):
    """(line saying how much disk a checkpoint takes, warning or None when the folder cannot hold the first
    epoch's last.pt and best.pt)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # optimizer state is fp32
    optimizer = OPTIMIZER_COPIES.get(optimizer_name, 2) * params
    total, free = weights + optimizer, free_bytes(output_dir)
    line = (f"one checkpoint takes about {megabytes(total)} (weights {megabytes(weights)}, optimizer state "
            f"{megabytes(optimizer)}); the first epoch writes two (last.pt, best.pt) and later ones briefly a "
            f"third while one is replaced" + (f"; {megabytes(free)} free in {output_dir}" if free is not None else ""))
    warning = None
    if free is not None and free < 2 * total:
        warning = (f"{output_dir} has {megabytes(free)} free, less than the {megabytes(2 * total)} the first epoch "
                   f"writes: free space or choose another --output-dir, or the run will stop at its first checkpoint")
    return line, warning
