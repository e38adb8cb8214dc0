"""train.py --minutes M: the number of epochs that fits a time budget, fixed from the first epoch's measured time.

    budget = TimeBudget(15, steps_per_epoch=36, val_every=2, start=time.time())
    budget.record(train_seconds, validation_seconds)     # after each epoch (the first always validates)
    epochs = budget.plan(time.time())                    # e.g. 41: the learning-rate schedule then spans 41 epochs

The first epoch is measured whole (steps, loader, validation), so the plan includes everything an epoch costs; it
also pays one-time costs (painting a cold mask cache, the first steps' warm-up), so the plan errs short. Epochs
that later run slower (another job on the cores) move the end earlier (`replan`), always leaving at least one epoch
so that the schedule still reaches its final rate.
"""
import time

from distributed import rank0_value
from outputs import write_json


class TimeBudget:
    def __init__(self, minutes, steps_per_epoch, val_every, start):
        if minutes <= 0:
            raise ValueError(f"--minutes must be positive, not {minutes}")
        self.seconds, self.steps_per_epoch, self.val_every, self.start = minutes * 60, steps_per_epoch, val_every, start
        self.train_seconds, self.val_seconds = [], []

    def record(self, train_seconds, val_seconds=None):
        self.train_seconds.append(train_seconds)
        if val_seconds is not None:
            self.val_seconds.append(val_seconds)

    def validations(self, first, epochs):
        """Validations among epochs first..epochs-1: train.py validates every val_every epochs, and the last."""
        if epochs <= first:
            return 0
        due = epochs // self.val_every - first // self.val_every
        return due + (epochs % self.val_every != 0)

    def cost(self, done, epochs, train_s, val_s):
        return (epochs - done) * train_s + self.validations(done, epochs) * val_s

    def fits(self, done, left, train_s, val_s):
        """The most epochs in all whose epochs done..end fit `left` seconds; at least done + 1."""
        n = done + 1
        while n < 100_000 and self.cost(done, n + 1, train_s, val_s) <= left:
            n += 1
        return n

    def plan(self, now):
        """Epochs in all (at least 1, the one already done), from the first epoch's times and what is left."""
        train_s, val_s = self.train_seconds[0], self.val_seconds[0] if self.val_seconds else 0.0
        left = self.seconds - (now - self.start)
        return self.fits(1, left, train_s, val_s) if self.cost(1, 2, train_s, val_s) <= left else 1

    def replan(self, done, planned, now):
        """Fewer epochs where the epochs since the first ran slower than planned and the end would pass the budget;
        None to keep the plan. done: epochs finished. At least one epoch is left to run."""
        later = self.train_seconds[1:]
        if not later or planned - done < 2:
            return None
        train_s = sum(later) / len(later)
        val_s = sum(self.val_seconds) / len(self.val_seconds) if self.val_seconds else 0.0
        left = self.seconds - (now - self.start)
        if self.cost(done, planned, train_s, val_s) <= left:
            return None
        return self.fits(done, left, train_s, val_s)

    def describe(self, epochs, minutes):
        train_s = self.train_seconds[0]
        val_s = self.val_seconds[0] if self.val_seconds else 0.0
        total = self.cost(0, epochs, train_s, val_s)
        return (f"--minutes {minutes:g}: {epochs} epochs of {self.steps_per_epoch} steps at "
                f"{train_s / max(self.steps_per_epoch, 1):.2f} s/step, {self.validations(0, epochs)} validations of "
                f"{val_s:.0f} s: about {total / 60:.1f} min")


def plan_text(args, checkpoint):
    if args.minutes and not checkpoint:
        return f"the epochs that fit --minutes {args.minutes:g} (planned after the first)"
    return f"{args.epochs} epochs"


def follow_budget(run, epoch, train_seconds, val_seconds, args, log):
    """--minutes: after the first epoch, plan the epochs that fit (the schedule reads args.epochs at every step);
    after later ones, end earlier where epochs have slowed. Rank 0's clock decides for every rank."""
    budget, now = run["budget"], time.time()
    budget.record(train_seconds, val_seconds)
    planned = budget.plan(now) if args.budget is None else budget.replan(epoch + 1, args.epochs, now)
    planned = rank0_value(planned or 0, run["world"], run["device"])
    if not planned:
        return
    if args.budget is None:
        log.print(budget.describe(planned, args.minutes))
        args.budget = {"minutes": args.minutes, "epochs": planned, "first_epoch_seconds": train_seconds,
                       "validation_seconds": val_seconds, "steps_per_epoch": run["steps_per_epoch"]}
    else:
        log.print(f"--minutes {args.minutes:g}: epochs ran slower than planned; ending after {planned} epochs, "
                  f"not {args.epochs}")
        args.budget["epochs"] = planned
    log.log({"epoch": epoch, "budget": dict(args.budget)})
    args.epochs = planned
    if run["rank"] == 0:
        write_json(run["output_dir"] / "config.json", vars(args), indent=1)
    run["last_epoch"] = min(planned, args.stop_after if args.stop_after is not None else planned)
