"""Start-up resolution of a configured task: shards, target set, fixed batch shape [R, S].

Everything a task's batches depend on is decided here once, so that a misconfigured or empty
task fails at start-up with a :class:`~megatron_uni.config.ConfigError` naming the task's field,
not minutes later inside a loader worker.

Fixed shapes. Every micro-batch of a task is [R, S] (``num_rows`` x ``seq_len``) so pipeline
stages can pre-allocate. When ``num_rows`` is unset, R is the worst case of first-fit packing
(:func:`megatron_uni.data.packing.pack`): exact for classification (fixed input length, known
target names; the largest over the data-parallel ranks when the target set is split), and for
variable-length inputs (MLM texts, captions) an upper bound: ``k = S // longest input`` inputs
always fit a row that holds fewer than ``k`` (first fit never leaves such a row unfilled), so
inputs need at most ``ceil(B / k)`` new rows, and the same holds for the targets after them.

Target sets (``target_set``, a path relative to ``data.root``):
- classification: a text file, one class name per line; each becomes "[SPE] name" targets;
- MLM and captioning: a JSON list of BPE token ids (the vocabulary scored against), or the word
  ``clip`` for all 49,408 CLIP BPE tokens;
- retrieval: none (the batch's own captions).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_uni.config import Config, ConfigError, TaskConfig
from megatron_uni.batch import FAMILY_OF_TASK_TYPE
from megatron_uni.data.readers import expand_shards, missing_shards
from megatron_uni.data.tasks import SharedTargets, TargetMix, target_shard
from megatron_uni.data.text_tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

NUM_BPE_TOKENS = 49408  # CLIP's BPE ids; the three Uni-Perceiver specials follow


@dataclass(frozen=True)
class TaskPlan:
    """A task resolved for one data-parallel rank: what to read and the batch shape."""

    name: str
    task_id: int  # index in data.tasks (config order): the task-routing condition
    cfg: TaskConfig
    family: str  # classification / mlm / captioning / retrieval
    video: bool
    patch_size: int
    clip_tokens: int  # patch tokens of one clip (frames x patches per frame); 0 for text
    seq_len: int
    num_rows: int
    max_text_len: int  # text tokens kept per MLM text or caption (captions: incl. <eot>)
    shards: tuple[str, ...]
    eval_shards: tuple[str, ...]
    class_names: tuple[tuple[int, ...], ...]  # classification targets (BPE ids per name)
    vocab: tuple[int, ...]  # MLM / captioning targets (one BPE id each)
    target_shard: range | None  # this rank's part of a split target set
    mix: TargetMix | None = None  # per-rank mixing: the shared target sets every rank encodes

    @property
    def num_targets(self) -> int:
        return len(self.class_names) if self.family == "classification" else len(self.vocab)


def _field(name: str, key: str) -> str:
    return f"data.tasks.{name}.{key}"


def _resolve(root: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def _read_text(name: str, task: TaskConfig, path: Path, what: str) -> str:
    """``path`` as UTF-8; a file in another encoding (or unreadable) is a ConfigError naming
    the file, the byte and the fix."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"task {name}: target set file {path} is not UTF-8 text (byte {err.start}: "
            f"{err.object[err.start:err.start + 1]!r})", field=_field(name, "target_set"),
            value=task.target_set,
            fix=f"save it as UTF-8 ({what}), e.g. iconv -f latin1 -t utf-8 {path.name}",
        ) from None
    except OSError as err:
        raise ConfigError(
            f"task {name}: cannot read target set file {path} ({err.strerror})",
            field=_field(name, "target_set"), value=task.target_set,
            fix="make it readable or fix the path",
        ) from None


def load_target_set(
    name: str, task: TaskConfig, root: str, tokenizer: ClipTokenizer
) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """(class names as BPE ids, vocabulary ids) of ``task``; the one it does not use is ()."""
    family = FAMILY_OF_TASK_TYPE[task.type]
    if family == "retrieval":
        return (), ()
    if not task.target_set:
        what = "a class-name file" if family == "classification" else "a vocabulary file"
        raise ConfigError(
            f"task {name} ({task.type}) scores against a target set but names none",
            field=_field(name, "target_set"), value=task.target_set,
            fix=f"set it to {what} relative to data.root",
        )
    if family != "classification" and task.target_set == "clip":
        return (), tuple(range(NUM_BPE_TOKENS))
    path = _resolve(root, task.target_set)
    if not path.is_file():
        raise ConfigError(
            f"task {name}: target set file {path} does not exist",
            field=_field(name, "target_set"), value=task.target_set,
            fix="write it (the shard builders and tools.make_demo_data do) or fix the path",
        )
    if family == "classification":
        if path.suffix == ".json":
            raise ConfigError(
                f"task {name}: class names are a text file, one name per line, not {path.name}",
                field=_field(name, "target_set"), value=task.target_set,
                fix="name the class-name file (e.g. classes.txt from tools.build_shards)",
            )
        text = _read_text(name, task, path, "class names, one per line")
        names = [line.strip() for line in text.splitlines() if line.strip()]
        ids = tuple(tuple(tokenizer.encode(n)) for n in names)
        if not ids or any(not i for i in ids):
            raise ConfigError(
                f"task {name}: {path} must list one non-empty class name per line",
                field=_field(name, "target_set"), value=task.target_set,
            )
        return ids, ()
    try:
        vocab = json.loads(_read_text(name, task, path, "a JSON list of BPE token ids"))
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"task {name}: {path} is not JSON ({err})", field=_field(name, "target_set"),
            value=task.target_set, fix="write a JSON list of BPE token ids",
        ) from None
    if (not isinstance(vocab, list) or not vocab
            or not all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in vocab)):
        raise ConfigError(
            f"task {name}: {path} must be a non-empty JSON list of token ids in "
            f"[0, {tokenizer.vocab_size})", field=_field(name, "target_set"),
            value=task.target_set,
        )
    return (), tuple(vocab)


def first_fit_rows(lengths: Sequence[int], seq_len: int) -> int:
    """Rows that :func:`~megatron_uni.data.packing.pack` uses for sequences of ``lengths``."""
    used: list[int] = []
    for n in lengths:
        for r, u in enumerate(used):
            if u + n <= seq_len:
                used[r] += n
                break
        else:
            used.append(n)
    return len(used)


def _bound(count: int, longest: int, seq_len: int) -> int:
    return math.ceil(count / (seq_len // longest)) if count else 0


def worst_case_rows(
    family: str, batch: int, seq_len: int, clip_tokens: int, max_text_len: int,
    target_lengths: Sequence[int],
) -> int:
    """Rows a micro-batch of ``batch`` samples can need at most (see the module docstring)."""
    if family == "classification":
        return first_fit_rows([1 + clip_tokens] * batch + list(target_lengths), seq_len)
    if family == "retrieval":
        return first_fit_rows([1 + clip_tokens] * batch, seq_len) + _bound(
            batch, 1 + max_text_len, seq_len
        )
    longest = 1 + max_text_len if family == "mlm" else 1 + clip_tokens + 2 * max_text_len
    rows = _bound(batch, longest, seq_len)
    return rows + _bound(len(target_lengths), 2, seq_len)


def plan_task(
    cfg: Config, name: str, dp_rank: int, dp_size: int, tokenizer: ClipTokenizer,
    *, need_train: bool, need_eval: bool, mixes: Sequence[TargetMix] | None = None,
) -> TaskPlan:
    """Resolve task ``name`` for ``dp_rank`` of ``dp_size``; raises ConfigError naming it.

    ``mixes`` (per-rank mixing): this task's :class:`TargetMix` as every data-parallel rank
    sees it (index = rank); the rows then also hold the other shared target sets' shards."""
    task = cfg.data.tasks[name]
    family = FAMILY_OF_TASK_TYPE[task.type]
    video = task.video if task.video is not None else (
        task.type == "video_classification" or task.num_frames > 1)
    patches = (task.image_size // cfg.model.patch_size) ** 2
    clip_tokens = 0 if family == "mlm" else task.num_frames * patches
    shards = _shard_list(cfg, name, "shards", need_train)
    eval_shards = _shard_list(cfg, name, "eval_shards", need_eval)
    class_names, vocab = load_target_set(name, task, cfg.data.root, tokenizer)
    S = task.seq_len

    # The longest text that fits: MLM "[SPE] text", captioning "[SPE] clip text slots",
    # retrieval "[SPE] caption".
    room = {"mlm": S - 1, "captioning": (S - 1 - clip_tokens) // 2, "retrieval": S - 1}
    max_text = 0
    if family != "classification":
        if room[family] < 1:
            raise ConfigError(
                f"task {name}: rows of {S} tokens leave no room for text after the clip",
                field=_field(name, "seq_len"), value=S, fix=f"raise {_field(name, 'seq_len')}",
            )
        max_text = task.max_text_len if task.max_text_len is not None else room[family]
        if max_text > room[family]:
            raise ConfigError(
                f"task {name}: rows of {S} tokens hold {family} texts of at most "
                f"{room[family]} tokens", field=_field(name, "max_text_len"), value=max_text,
                fix=f"lower it to {room[family]} or raise {_field(name, 'seq_len')}",
            )
        if 1 + max_text > cfg.model.max_text_positions:
            raise ConfigError(
                f"task {name}: texts of {max_text} tokens need more than "
                f"model.max_text_positions ({cfg.model.max_text_positions}) positions",
                field=_field(name, "max_text_len"), value=max_text,
                fix=f"set {_field(name, 'max_text_len')} below model.max_text_positions",
            )
    longest = 1 + clip_tokens if family != "mlm" else 2
    target_longest = 1 + max((len(n) for n in class_names), default=1)
    if max(longest, target_longest) > S:
        what = f"a clip needs {longest}" if longest > S else f"a class name needs {target_longest}"
        raise ConfigError(
            f"task {name}: {what} tokens but rows hold {S}", field=_field(name, "seq_len"),
            value=S, fix=f"raise {_field(name, 'seq_len')} (or lower image_size / num_frames)",
        )

    num_targets = len(class_names) if family == "classification" else len(vocab)
    shard = target_shard(num_targets, dp_rank, dp_size) if task.split_target_set else None

    def target_lengths(rank_shard: range | None) -> list[int]:
        indices = range(num_targets) if rank_shard is None else rank_shard
        if family == "classification":
            return [1 + len(class_names[min(i, num_targets - 1)]) for i in indices]
        return [2] * len(indices)

    shards_over_ranks = (
        [target_shard(num_targets, r, dp_size) for r in range(dp_size)] if shard else [None]
    )
    needed = max(
        worst_case_rows(family, task.micro_batch_size, S, clip_tokens, max_text, target_lengths(s))
        for s in shards_over_ranks
    )
    if mixes:
        # The other shared sets' shards follow in rows of their own (an upper bound: first fit
        # may put them into the gaps), as many as the worst rank needs.
        extra = max(first_fit_rows(_mix_lengths(m), S) for m in mixes)
        needed += extra
        longest_extra = max((n for m in mixes for n in _mix_lengths(m)), default=0)
        if longest_extra > S:
            raise ConfigError(
                f"task {name}: a shared target of {longest_extra} tokens does not fit rows of "
                f"{S} (data.task_sampling=per_rank packs every shared target set)",
                field=_field(name, "seq_len"), value=S, fix=f"raise {_field(name, 'seq_len')}")
    num_rows = task.num_rows if task.num_rows is not None else needed
    if num_rows < needed:
        if family == "classification":
            raise ConfigError(
                f"task {name}: a micro-batch of {task.micro_batch_size} clips and "
                f"{len(target_lengths(shard))} class names needs {needed} rows of {S} tokens",
                field=_field(name, "num_rows"), value=num_rows,
                fix=f"set it to {needed} or null (or lower micro_batch_size)",
            )
        logger.warning(
            "task %s: num_rows=%d is below the worst case %d; a batch of long texts will not "
            "fit and fail", name, num_rows, needed,
        )
    return TaskPlan(
        name=name, task_id=list(cfg.data.tasks).index(name), cfg=task, family=family,
        video=video, patch_size=cfg.model.patch_size, clip_tokens=clip_tokens, seq_len=S,
        num_rows=num_rows, max_text_len=max_text, shards=tuple(shards),
        eval_shards=tuple(eval_shards), class_names=class_names, vocab=vocab, target_shard=shard,
        mix=mixes[dp_rank] if mixes else None,
    )


def _mix_lengths(mix: TargetMix) -> list[int]:
    """Token lengths of the shared targets a rank packs besides its own set's."""
    return [1 + len(s.targets[min(i, len(s.targets) - 1)])
            for k, s in enumerate(mix.sets) if k != mix.own for i in s.shard]


def shared_target_sets(
    cfg: Config, dp_rank: int, dp_size: int, tokenizer: ClipTokenizer
) -> tuple[tuple[SharedTargets, ...], dict[str, int]]:
    """The split target sets of the training mixture (tasks of weight > 0 with
    ``split_target_set``), in config order and one per distinct file and kind (MLM and
    captioning scoring the same vocabulary share it), with ``dp_rank``'s shards; and per task
    the index of its own set."""
    sets: dict[str, SharedTargets] = {}
    own: dict[str, int] = {}
    for name, task in cfg.data.tasks.items():
        if task.weight <= 0 or not task.split_target_set:
            continue
        family = FAMILY_OF_TASK_TYPE[task.type]
        if family == "retrieval":
            continue
        class_names, vocab = load_target_set(name, task, cfg.data.root, tokenizer)
        kind = "classes" if family == "classification" else "vocab"
        key = f"{kind}:{task.target_set}"
        if key not in sets:
            targets = class_names if kind == "classes" else tuple((t,) for t in vocab)
            attribute = "text_target" if kind == "classes" else "vocab_target"
            sets[key] = SharedTargets(key, targets, attribute,
                                      target_shard(len(targets), dp_rank, dp_size))
        own[name] = list(sets).index(key)
    return tuple(sets.values()), own


def _shard_list(cfg: Config, name: str, key: str, required: bool) -> list[str]:
    pattern = getattr(cfg.data.tasks[name], key)
    if not pattern:
        if required:
            raise ConfigError(
                f"task {name} has no {key}", field=_field(name, key), value=pattern,
                fix=f"set {_field(name, key)} to a shard pattern relative to data.root",
            )
        return []
    shards = expand_shards(pattern, cfg.data.root)
    missing = missing_shards(shards)
    if not shards or missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        why = "matches no file" if not shards else f"names {len(missing)} missing files: {shown}"
        raise ConfigError(
            f"task {name}: {key} {why} (data.root={cfg.data.root})", field=_field(name, key),
            value=pattern, fix="build the shards (tools.build_shards, tools.make_demo_data) or "
            "fix the pattern",
        )
    return shards


def plan_training_tasks(
    cfg: Config, dp_rank: int, dp_size: int, tokenizer: ClipTokenizer
) -> dict[str, TaskPlan]:
    """Plans of the tasks with weight > 0; every other task must at least be evaluated."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
    if not cfg.data.tasks:
        raise ConfigError(
            "no tasks to train", field="data.tasks",
            fix="add tasks (e.g. include: ../tasks/demo.yaml)",
        )
    per_rank = cfg.data.task_sampling == "per_rank"
    if per_rank:
        # Read and tokenise the sets once; only the shards differ by rank.
        sets, owners = shared_target_sets(cfg, dp_rank, dp_size, tokenizer)
        by_rank = [(tuple(replace(t, shard=target_shard(len(t.targets), r, dp_size))
                          for t in sets), owners) for r in range(dp_size)]
    plans = {}
    for name, task in cfg.data.tasks.items():
        if task.weight > 0:
            mixes = ([TargetMix(sets, own.get(name, -1)) for sets, own in by_rank]
                     if per_rank else None)
            plans[name] = plan_task(cfg, name, dp_rank, dp_size, tokenizer,
                                    need_train=True, need_eval=False, mixes=mixes)
        elif not task.eval_shards:
            raise ConfigError(
                f"task {name} has weight 0 and no eval_shards, so it is never used",
                field=_field(name, "weight"), value=task.weight,
                fix="give it a weight > 0 or eval_shards, or remove it",
            )
    return plans
