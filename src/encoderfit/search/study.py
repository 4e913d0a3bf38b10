"""What a sweep searches, and the study that hands its trials out: Optuna, kept in SWEEP_DIR/study.log.

A dimension is a comma list (``2e-5,5e-5``: every value, or a categorical choice) or a range
(``1e-5:2e-4``, ``1e-5:2e-4:log``). Lists alone, without ``--trials``, make a grid: every combination,
enqueued in order. A range, or ``--trials N``, makes a sampled search: Optuna's TPE sampler proposes
N trials. Either way the study lives in a journal file beside the trials, so the same command
continues it, and several worker processes (``--parallel_trials``) may take trials from it at once.

The study maximizes: every value it is told is the task's metric signed so that higher is better.
"""
from __future__ import annotations

import fcntl
import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from encoderfit.utils import UserError

SWEPT = ("learning_rate", "epochs", "batch_size", "warmup_ratio", "weight_decay", "seed", "max_length", "model")
INTEGER = ("epochs", "batch_size", "seed", "max_length")
CATEGORICAL = ("model",)  # lists only: a range of models means nothing
PRUNERS = ("median", "none")
# the median pruner stops a trial at an epoch's end once this many trials have finished, when its best value
# so far is worse than the median of theirs at the same share of their schedule (epoch / epochs, in percent),
# and never before WARMUP_PERCENT of its schedule: a long schedule is still warming up when a short one is
# nearly done, and compared epoch for epoch it would lose to it
PRUNE_AFTER_TRIALS = 3
WARMUP_PERCENT = 50
# --time_budget without a searched flag: the learning rate and the epochs, the two that moved results most in
# the sweeps measured (a 77-intent set: 0.82 at 5 epochs x 5e-5, 0.94 at 10 x 6.5e-5)
DEFAULT_SPACE = {"learning_rate": "1e-5:2e-4:log", "epochs": "2:10"}
BUDGET_TRIALS = 1000  # a time budget's sampled search: trials until the budget is spent, at most this many
MAX_ASKS = 100  # proposals of recipes already tried before a sampled search is taken to be exhausted
SAMPLER_SEED = 0  # a sampled search run from scratch by one process proposes the same trials each time


@dataclass(frozen=True)
class Dimension:
    name: str
    choices: tuple = ()       # a comma list, the values as given
    low: float | None = None  # a range
    high: float | None = None
    log: bool = False

    @classmethod
    def parse(cls, name: str, text: str) -> "Dimension | str":
        """The dimension ``--name text`` asks for, or ``text`` itself when it is one plain value."""
        if ":" in text and name not in CATEGORICAL:
            parts = text.split(":")
            kind = int if name in INTEGER else float
            log = len(parts) == 3 and parts[2] == "log"
            if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
                raise UserError(f"--{name} {text}: a range is LOW:HIGH or LOW:HIGH:log")
            try:
                low, high = kind(parts[0]), kind(parts[1])
            except ValueError:
                raise UserError(f"--{name} {text}: invalid {kind.__name__} bound in the range") from None
            if not low < high or (log and low <= 0):
                raise UserError(f"--{name} {text}: a range needs LOW < HIGH" + (" and LOW > 0 on a log scale"
                                                                                  if log else ""))
            return cls(name, low=low, high=high, log=log)
        values = tuple(v.strip() for v in text.split(","))
        if "" in values or len(set(values)) != len(values):
            raise UserError(f"--{name} {text}: give distinct values separated by commas")
        return values[0] if len(values) == 1 else cls(name, choices=values)

    @property
    def spec(self):
        """As sweep.json records it: the list of values, or the range as typed."""
        if self.choices:
            return list(self.choices)
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "")

    def extremes(self) -> tuple:
        """Values that every trial's flags lie between: checked as flags before the sweep starts."""
        return self.choices or (self.value(self.low), self.value(self.high))

    def value(self, x) -> str:
        """The flag's value for a sampled number (four significant digits: a recipe a person can read)."""
        if self.name in INTEGER:
            return str(int(x))
        return f"{x:.3e}" if 0 < abs(x) < 1e-3 else f"{x:.4g}"  # 2.288e-04, not 0.0002288

    def suggest(self, trial) -> str:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.name in INTEGER:
            return self.value(trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log))
        return self.value(trial.suggest_float(self.name, self.low, self.high, log=self.log))


@dataclass(frozen=True)
class Space:
    dimensions: tuple      # of Dimension, in SWEPT's order
    trials: int | None     # --trials: a sampled search of this many; None: the whole grid
    pruner: str            # median or none

    @classmethod
    def from_flags(cls, given: dict, trials: str | None, pruner: str | None, budget: bool = False,
                   fixed: tuple = ()) -> "Space":
        """``given``: {flag: Dimension}. Refuses what cannot be searched, in one line. ``budget``: a time budget,
        a sampled search (where nothing is searched, over DEFAULT_SPACE's flags not ``fixed`` to one value) of
        trials until it is spent."""
        if budget and not given:
            given = {n: Dimension.parse(n, v) for n, v in DEFAULT_SPACE.items() if n not in fixed}
        if budget and trials is None:
            trials = str(BUDGET_TRIALS)
        dims = tuple(given[n] for n in SWEPT if n in given)
        if not dims:
            raise UserError(f"nothing to sweep: give a comma list or a range to one of "
                            f"{', '.join('--' + n for n in SWEPT)} (e.g. --learning_rate 2e-5,5e-5 or "
                            f"--learning_rate 1e-5:2e-4:log --trials 8)")
        count = None
        if trials is not None:
            try:
                count = int(trials)
            except ValueError:
                count = 0
            if count < 1:
                raise UserError(f"--trials {trials}: give a whole number of trials, 1 or more")
        ranges = [d for d in dims if not d.choices]
        if ranges and count is None:
            raise UserError(f"--{ranges[0].name} {ranges[0].spec} is a range: say how many trials to sample "
                            f"from it with --trials N")
        finite = all(d.choices or d.name in INTEGER for d in dims)  # lists and integer ranges: countable
        if count is not None and finite and not budget:
            size = 1
            for d in dims:
                size *= len(d.choices) if d.choices else int(d.high) - int(d.low) + 1
            if count > size:
                what = "the lists give" if not ranges else "the space holds"
                raise UserError(f"--trials {count}: {what} {size} combination(s); ask for at most {size}" +
                                ("" if ranges else ", or leave --trials out to train each of them (a grid)"))
        if pruner is not None and pruner not in PRUNERS:
            raise UserError(f"--pruner {pruner}: choose from {', '.join(PRUNERS)}")
        # a grid trains every combination to its end unless asked; a sampled search prunes by default
        return cls(dims, count, pruner or ("none" if count is None else "median"))

    @property
    def grid(self) -> bool:
        return self.trials is None

    def combinations(self) -> list:
        """The grid: every combination, as {flag: value}, the first flag varying slowest."""
        return [dict(zip((d.name for d in self.dimensions), combo))
                for combo in itertools.product(*(d.choices for d in self.dimensions))]

    def record(self) -> dict:
        return {"search": "grid" if self.grid else "sampled (Optuna TPE)", "pruner": self.pruner,
                "space": {d.name: d.spec for d in self.dimensions}}


class Study:
    """The sweep's Optuna study. Whoever asks for trials (the one process, rank 0, or each parallel
    worker) holds one; a lock file makes taking the next trial one step for all of them."""

    def __init__(self, sweep_dir: Path, space: Space, flags: list, worker: int = 0):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.space, self.dir = optuna, space, sweep_dir
        path = sweep_dir / "study.log"
        with self._lock():
            _cut_torn_tail(path)
        try:
            storage = JournalStorage(JournalFileBackend(str(path)))
            pruner = (optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS, n_warmup_steps=WARMUP_PERCENT)
                      if space.pruner == "median" else optuna.pruners.NopPruner())
            # the sampler's seed differs by worker and by how far the study has gone, so that a continued
            # or parallel search does not propose again the points it started with
            known = [s.study_name for s in storage.get_all_studies()]
            done = storage.get_n_trials(storage.get_study_id_from_name("sweep")) if "sweep" in known else 0
            # TPE proposes from what it has seen after a few random trials: a quarter of the sweep, 3 to 10
            sampler = optuna.samplers.TPESampler(seed=SAMPLER_SEED + 1000 * worker + done,
                                                 n_startup_trials=min(10, max(3, (space.trials or 0) // 4)))
            self.study = optuna.create_study(storage=storage, study_name="sweep", direction="maximize",
                                             load_if_exists=True, pruner=pruner, sampler=sampler)
        except Exception as exc:  # a damaged journal: name the file rather than show Optuna's internals
            raise UserError(f"{path}: cannot read the sweep's study ({exc}); give another --sweep_dir") from None
        self.flags = flags  # the training flags every trial shares
        self.live = {}  # trial number -> the Optuna trial this process runs

    def begin(self) -> None:
        """The first process of a launch: records the sweep (or checks that it is the same one) and puts
        back the trials an earlier launch left running, to be resumed in their run directories. Each
        part may be interrupted and done again: it only adds what is missing."""
        mine = {"space": self.space.record(), "flags": self.flags}
        theirs = self.study.user_attrs.get("identity")
        if theirs is None:
            self.study.set_user_attr("identity", mine)  # first, so that a launch stopped below is continued
        elif theirs["space"] != mine["space"] or _flag_set(theirs["flags"]) != _flag_set(mine["flags"]):
            raise UserError(f"{self.dir} holds another sweep (space {theirs['space']['space']}, flags "
                            f"{' '.join(theirs['flags']) or 'none'}): give another --sweep_dir")
        state = self.optuna.trial.TrialState
        trials = self.study.get_trials(deepcopy=False)
        named = {t.user_attrs.get("run_name") for t in trials}
        if self.space.grid:
            for combo, name in zip(self.space.combinations(), self._names(len(self.space.combinations()))):
                if name not in named:
                    self.study.enqueue_trial(combo, user_attrs={"run_name": name})
        waiting = {t.user_attrs.get("run_name") for t in trials if t.state == state.WAITING}
        for t in trials:
            if t.state != state.RUNNING or "run_name" not in t.user_attrs:
                continue  # (a trial asked for but never named has no run: it is left to fail below)
            name = t.user_attrs["run_name"]
            self._not_in_use(name)
            if name not in waiting:  # put back first, then failed: stopped in between, it is not lost
                self.study.enqueue_trial(t.params, user_attrs={"run_name": name})
            # interrupted: failed without the diverged mark (trials() leaves it out); its copy resumes the run
            self.study.tell(t.number, state=state.FAIL)
        for t in trials:
            if t.state == state.RUNNING and "run_name" not in t.user_attrs:
                self.study.tell(t.number, state=state.FAIL)

    def _not_in_use(self, name: str) -> None:
        """A trial left running by an earlier launch may still be trained by a process of it (a worker whose
        parent was killed): refused, rather than trained twice."""
        run_dir = self.dir / name
        if not run_dir.is_dir():
            return
        from encoderfit.run.trainer import RunInUse, RunLock

        try:
            RunLock(run_dir).release()
        except RunInUse as exc:
            raise UserError(f"{self.dir} is in use: its {name} is being trained by {exc.holder} (wait for that "
                            f"launch to end, or stop it, then run the same sweep command again; to train trials "
                            f"side by side, use --parallel_trials)") from None

    def next_trial(self, worker: str | None = None) -> dict | None:
        """The next trial to run, {number, name, flags}, or None when every one is taken. ``worker``: the
        parallel worker that runs it, recorded."""
        with self._lock():
            known = self.trials()  # named trials only: a name is given under this lock, right after ask()
            if not any(t["status"] == "to do" for t in known) and (self.space.grid or len(known) >= self.space.trials):
                return None
            for _ in range(MAX_ASKS):
                trial = self.study.ask()
                flags = {d.name: d.suggest(trial) for d in self.space.dimensions}
                if "run_name" in trial.user_attrs or all(t["flags"] != flags for t in known):
                    break
                # a sampled recipe already tried (a small discrete space): not trained twice
                trial.set_user_attr("duplicate", True)
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
            else:
                return None  # every recipe this space holds has been tried
            if "run_name" not in trial.user_attrs:
                trial.set_user_attr("run_name", self._names(len(known) + 1)[-1])
            trial.set_user_attr("worker", worker)
        self.live[trial.number] = {"trial": trial, "reported": set()}
        return {"number": trial.number, "name": trial.user_attrs["run_name"], "flags": flags}

    def report(self, number: int, history: list, epochs: int) -> bool:
        """The trial's signed validation values so far, [(epoch, value)] (a resumed run's earlier epochs
        too, which its continuation did not report yet), of a schedule of ``epochs``; True when the pruner says
        it should stop. Each value stands for the trial's share of its schedule up to that epoch
        (``schedule_steps``), so trials of different lengths are compared at the same share."""
        live = self.live[number]
        for step, value in schedule_steps(history, epochs):
            if step not in live["reported"]:
                live["trial"].report(value, step=step)
                live["reported"].add(step)
        return live["trial"].should_prune()

    def tell(self, number: int, outcome: str, value: float | None = None, record: dict | None = None) -> None:
        """done (with the trial's best signed value), pruned or diverged; ``record``: what the sweep's table
        shows of the trial (its metric, epochs, time), kept with it in the study."""
        state = self.optuna.trial.TrialState
        trial = self.live.pop(number)["trial"]
        if record is not None:
            trial.set_user_attr("outcome", record)
        if outcome == "diverged":
            trial.set_user_attr("diverged", True)
        if value is not None and value != value:
            value = float("-inf")  # a NaN metric (constant predictions): the worst, not a failed trial
        self.study.tell(trial, value if outcome == "done" else None,
                        state={"done": state.COMPLETE, "pruned": state.PRUNED, "diverged": state.FAIL}[outcome])

    def trials(self) -> list:
        """Every trial of the sweep, in name order, as {name, flags, status}; an interrupted one replaced
        by its continuation appears once."""
        state = self.optuna.trial.TrialState
        status = {state.COMPLETE: "done", state.PRUNED: "pruned", state.RUNNING: "running",
                  state.WAITING: "to do", state.FAIL: "diverged"}
        out = {}
        for t in self.study.get_trials(deepcopy=False):
            if "run_name" not in t.user_attrs or (t.state == state.FAIL and not t.user_attrs.get("diverged")):
                continue  # not named yet (being asked for), a duplicate, or interrupted and enqueued again
            params = t.params or t.system_attrs.get("fixed_params", {})  # a waiting trial's are fixed ones
            flags = {d.name: (params[d.name] if d.choices else d.value(params[d.name]))
                     for d in self.space.dimensions if d.name in params}
            out[t.user_attrs["run_name"]] = {"name": t.user_attrs["run_name"], "flags": flags,
                                             "status": status[t.state], "worker": t.user_attrs.get("worker"),
                                             **t.user_attrs.get("outcome", {})}
        return [out[n] for n in sorted(out)]

    def user_attr(self, key: str, default=None):
        return self.study.user_attrs.get(key, default)

    def set_user_attr(self, key: str, value) -> None:
        self.study.set_user_attr(key, value)

    @staticmethod
    def _names(count: int) -> list:
        return [f"trial-{i:03d}" for i in range(1, count + 1)]

    @contextmanager
    def _lock(self):
        with open(self.dir / ".study.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
            yield


def schedule_steps(history: list, epochs: int) -> list:
    """[(percent of the schedule, the best signed value by then)] for every whole percent the epochs of
    ``history`` cover: epoch e of E stands for the percents after (e-1)/E up to e/E, so a 3-epoch trial's
    first epoch and a 10-epoch trial's third are both at 30 (the step function of the best value so far)."""
    out, best, done = [], float("-inf"), 0
    for epoch, value in sorted(history):
        best = max(best, value) if value == value else best
        reach = min(100, (100 * epoch) // epochs)
        out += [(p, best) for p in range(done + 1, reach + 1)] if best != float("-inf") else []
        done = max(done, reach)
    return out


def _flag_set(flags: list) -> list:
    """Flags as sorted (name, value) pairs: the same flags in another order are the same sweep."""
    pairs, i = [], 0
    while i < len(flags):
        name, eq, value = str(flags[i]).partition("=")
        if not eq and i + 1 < len(flags) and not str(flags[i + 1]).startswith("--"):
            value, i = str(flags[i + 1]), i + 1
        elif not eq:
            value = True
        pairs.append((name, value))
        i += 1
    return sorted(pairs, key=str)


def _cut_torn_tail(path: Path) -> None:
    """A journal whose last record was cut (a full disk, a kill in mid-write): back to its last whole line,
    so that it reads again and the next record starts on a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
