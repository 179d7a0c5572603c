"""Synthetic interaction logs with planted behavior pathways, for testing pathway models.

Real logs never say which past behaviors explain the next one, so a router that "finds the
pathway" cannot be checked on them. This generator plants pathways of the three shapes the
RETR paper describes, hides them among popularity-skewed noise behaviors, and records which
positions explain each user's last item.

Design
------
* Items ``"1".."n_items"`` are split (at random) into ``n_themes`` themes. Each theme has a
  cyclic internal order, so every item has a *successor* in its theme; every item also has
  a fixed *partner* (a random cyclic permutation of all items, never the item itself).
* A user's sequence is a chain of *episodes*; each ends with a target explained by three
  pathway tokens of the episode:

  - ``correlated``: three consecutive theme items ``t[j], t[j+1], t[j+2]`` right before the
    target ``t[j+3]``; at most one noise behavior intrudes into the burst.
  - ``casual``: one item ``x`` at three scattered positions, each followed by at least one
    noise behavior (when ``noise > 0``); the target is ``partner(x)``.
  - ``drifted``: three items of an old theme A in order, then three of a new theme B in order;
    the target is B's next item. Only the B tokens are the pathway; A is noise now.

* Noise behaviors are drawn from a Zipf-like popularity (exponent 0.9) over a random item
  order, so the most popular items are noise and a popularity ranking does badly on targets.
  Each signal token brings a geometric number of noise tokens, so a fraction ``noise`` of
  an episode's behaviors are noise; casual episodes carry a few more for their gaps (with
  the default 0.4: 0.40 in correlated and drifted episodes, 0.48 in casual ones, 0.42 overall;
  the old theme of a drifted episode comes on top).
* The target is a deterministic function of the pathway tokens; all the difficulty is
  finding them among the noise. Every episode (not only the last) has this structure, so
  next-item training on every position sees the signal.

The last episode of every user is complete and ends the sequence; earlier episodes fill the
sequence to its length and the earliest one may be cut at the front. Ground truth is kept for
the last item only: ``pathways[user] = {"shape", "positions", "target"}`` (0-based positions
in the user's chronological sequence, all before the last position), plus ``old_positions``
(the abandoned theme's tokens) for ``drifted``.

With the default config (2,000 users, 400 items) every item occurs far more than 5 times
(the rarest about 90 times, across seeds 0-3), so 5-core filtering keeps 100% of users and
interactions. The planted rule (:func:`planted_rule`) predicts every last item; a popularity
ranking reaches HR@10 of about 0.03, and simple transition counts learnt from the training
prefixes (no ground truth) about 0.97, so the signal is there to be learnt.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retr.errors import DataError
from retr.limits import json_loads
from retr.utils import atomic_write, atomic_write_json

SHAPES: tuple[str, ...] = ("correlated", "casual", "drifted")
PATHWAY_LEN = 3
MIN_SEQUENCE_LEN = 10
POPULARITY_EXPONENT = 0.9
CORRELATED_INTRUDER_PROB = 0.3
CONFIG_FILE = "synthetic_config.json"
LOG_FILE = "interactions.csv"
PATHWAYS_FILE = "pathways.json"
FORMAT_VERSION = 1

_NOISE, _PATH, _TARGET, _OLD = 0, 1, 2, 3
# Per shape: (role, sort key) of the signal tokens of one episode; the target's key is the
# largest, so it always ends the episode. Noise tokens get random keys and interleave.
_TEMPLATES: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {
    "correlated": ((_PATH, _PATH, _PATH, _TARGET), (0.85, 0.9, 0.95, 1.0)),
    "casual": ((_PATH, _PATH, _PATH, _TARGET), (0.25, 0.5, 0.75, 1.0)),
    "drifted": ((_OLD, _OLD, _OLD, _PATH, _PATH, _PATH, _TARGET),
                (0.1, 0.2, 0.3, 0.55, 0.7, 0.85, 1.0)),
}
_BURST_START = 0.85
_CASUAL_GAPS = ((0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate; ``noise`` is the expected fraction of noise behaviors."""

    n_users: int = 2000
    n_items: int = 400
    min_len: int = 20
    max_len: int = 50
    n_themes: int = 20
    noise: float = 0.4
    shapes: tuple[str, ...] = SHAPES
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> DataError:
            return DataError(f"synthetic config: {key}={getattr(self, key)!r} {why}")

        if self.n_users < 1:
            raise bad("n_users", "must be >= 1")
        if self.n_themes < 2:
            raise bad("n_themes", "must be >= 2 (drifted needs two themes)")
        if self.n_items < 4 * self.n_themes:
            raise bad("n_items", f"must be >= 4 * n_themes = {4 * self.n_themes} (a theme needs "
                                 "4 items for a burst and its next item)")
        if self.min_len < MIN_SEQUENCE_LEN:
            raise bad("min_len", f"must be >= {MIN_SEQUENCE_LEN} (a whole episode must fit)")
        if self.max_len < self.min_len:
            raise bad("max_len", f"must be >= min_len ({self.min_len})")
        if not 0.0 <= self.noise <= 0.9:
            raise bad("noise", "must be in [0, 0.9]")
        if not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise bad("shapes", f"must be a non-empty list of distinct shapes from {SHAPES}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise bad("shapes", f"has unknown shape(s) {unknown}; valid shapes: "
                                f"{', '.join(SHAPES)}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["shapes"] = list(self.shapes)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SyntheticConfig:
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - valid)
        if unknown:
            raise DataError(f"synthetic config: unknown key(s) {unknown}; valid keys: "
                            f"{', '.join(sorted(valid))}")
        kwargs = dict(obj)
        if "shapes" in kwargs:
            kwargs["shapes"] = tuple(kwargs["shapes"])
        return cls(**kwargs)


@dataclass(frozen=True)
class ThemeStructure:
    """The hidden item structure behind a config (0-based item indices; id = index + 1)."""

    theme_of: np.ndarray  # int64 [n_items]
    themes: tuple[np.ndarray, ...]  # items of each theme, in the theme's cyclic order
    successor: np.ndarray  # int64 [n_items]: next item of the same theme
    partner: np.ndarray  # int64 [n_items]: what follows a recurring (casual) item
    popularity: np.ndarray  # float64 [n_items]: noise sampling probabilities

    @staticmethod
    def index(item: str) -> int:
        return int(item) - 1

    @staticmethod
    def item_id(index: int) -> str:
        return str(int(index) + 1)

    def theme(self, item: str) -> int:
        return int(self.theme_of[self.index(item)])

    def next_in_theme(self, item: str) -> str:
        return self.item_id(self.successor[self.index(item)])

    def partner_of(self, item: str) -> str:
        return self.item_id(self.partner[self.index(item)])


@dataclass
class SyntheticLog:
    """A generated log and the planted pathway of every user's last item."""

    log: pd.DataFrame
    pathways: dict[str, dict[str, Any]]
    config: SyntheticConfig

    def save(self, directory: str | Path) -> None:
        """Write ``interactions.csv``, ``pathways.json`` and the config, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        frame = self.log[["user", "item", "timestamp"]]
        atomic_write(directory / LOG_FILE, lambda p: frame.to_csv(p, index=False))
        atomic_write_json(directory / PATHWAYS_FILE, self.pathways)
        atomic_write_json(directory / CONFIG_FILE,
                          {"format_version": FORMAT_VERSION, **self.config.to_json()})

    @classmethod
    def load(cls, directory: str | Path) -> SyntheticLog:
        directory = Path(directory)
        for name in (LOG_FILE, PATHWAYS_FILE, CONFIG_FILE):
            if not (directory / name).is_file():
                raise DataError(f"{directory / name}: missing; a saved synthetic log needs "
                                f"{LOG_FILE}, {PATHWAYS_FILE} and {CONFIG_FILE}")
        try:
            cfg = json_loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
            pathways = json_loads((directory / PATHWAYS_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{directory}: synthetic log metadata is not valid JSON "
                            f"({exc})") from None
        cfg.pop("format_version", None)
        log = pd.read_csv(directory / LOG_FILE, dtype={"user": str, "item": str,
                                                       "timestamp": np.float64})
        return cls(log=log, pathways=pathways, config=SyntheticConfig.from_json(cfg))


def theme_structure(config: SyntheticConfig) -> ThemeStructure:
    """The hidden themes, successors, partners and noise popularity of ``config``'s seed."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(2)[0])
    n = config.n_items
    perm = rng.permutation(n)
    themes = tuple(np.asarray(t, dtype=np.int64) for t in np.array_split(perm, config.n_themes))
    theme_of = np.empty(n, dtype=np.int64)
    successor = np.empty(n, dtype=np.int64)
    for t, members in enumerate(themes):
        theme_of[members] = t
        successor[members] = np.roll(members, -1)
    cycle = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[cycle] = np.roll(cycle, -1)
    weights = np.empty(n, dtype=np.float64)
    weights[rng.permutation(n)] = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** POPULARITY_EXPONENT
    return ThemeStructure(theme_of=theme_of, themes=themes, successor=successor,
                          partner=partner, popularity=weights / weights.sum())


def generate(config: SyntheticConfig) -> SyntheticLog:
    """Generate a log deterministically from ``config.seed`` (vectorised over users)."""
    st = theme_structure(config)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(2)[1])
    n_users = config.n_users
    lengths = rng.integers(config.min_len, config.max_len + 1, size=n_users)

    # Episodes: a fixed grid of candidate episodes per user, the last column being the last
    # episode; each has >= 4 tokens, so the grid always covers max_len.
    n_slots = math.ceil(config.max_len / 4) + 1
    shape_codes = np.array([SHAPES.index(s) for s in config.shapes], dtype=np.int64)
    ep_shape = shape_codes[rng.integers(0, len(shape_codes), size=(n_users, n_slots))]
    n_signal = np.array([len(_TEMPLATES[s][0]) for s in SHAPES], dtype=np.int64)[ep_shape]
    ep_noise = _noise_counts(rng, n_signal, ep_shape, config)
    ep_len = n_signal + ep_noise
    later = np.cumsum(ep_len[:, ::-1], axis=1)[:, ::-1] - ep_len  # tokens in later episodes
    keep = later < lengths[:, None]
    ep_user = np.broadcast_to(np.arange(n_users)[:, None], keep.shape)[keep]
    ep_is_last = np.broadcast_to(np.arange(n_slots)[None, :] == n_slots - 1, keep.shape)[keep]
    ep_shape, ep_noise = ep_shape[keep], ep_noise[keep]
    n_ep = len(ep_user)

    # Signal tokens, one block per shape.
    tok_ep, tok_key, tok_item, tok_role = [], [], [], []
    for code, shape in enumerate(SHAPES):
        eps = np.flatnonzero(ep_shape == code)
        if len(eps) == 0:
            continue
        roles, keys = _TEMPLATES[shape]
        items = _signal_items(shape, len(eps), st, rng)  # [E, len(roles)]
        tok_ep.append(np.repeat(eps, len(roles)))
        tok_key.append(np.tile(np.asarray(keys), len(eps)))
        tok_item.append(items.reshape(-1))
        tok_role.append(np.tile(np.asarray(roles, dtype=np.int64), len(eps)))

    # Noise tokens with random keys (kept before the target; shaped per episode kind).
    total_noise = int(ep_noise.sum())
    noise_ep = np.repeat(np.arange(n_ep), ep_noise)
    first = np.repeat(np.cumsum(ep_noise) - ep_noise, ep_noise)
    rank = np.arange(total_noise) - first  # index of the noise token inside its episode
    noise_shape = ep_shape[noise_ep]
    u = rng.random(total_noise)
    key = u.copy()
    corr = noise_shape == SHAPES.index("correlated")
    intruder = corr & (rank == 0) & (rng.random(total_noise) < CORRELATED_INTRUDER_PROB)
    key[corr] = u[corr] * _BURST_START
    key[intruder] = _BURST_START + u[intruder] * (1.0 - _BURST_START)
    casual = noise_shape == SHAPES.index("casual")
    for g, (lo, hi) in enumerate(_CASUAL_GAPS):
        forced = casual & (rank == g)
        key[forced] = lo + u[forced] * (hi - lo)
    key = np.minimum(key, np.nextafter(1.0, 0.0))
    tok_ep.append(noise_ep)
    tok_key.append(key)
    tok_item.append(rng.choice(config.n_items, size=total_noise, p=st.popularity))
    tok_role.append(np.zeros(total_noise, dtype=np.int64))

    ep_of = np.concatenate(tok_ep)
    keys_all = np.concatenate(tok_key)
    items_all = np.concatenate(tok_item).astype(np.int64)
    roles_all = np.concatenate(tok_role)
    order = np.lexsort((roles_all, keys_all, ep_of))  # episodes are numbered user-major
    ep_of, items_all, roles_all = ep_of[order], items_all[order], roles_all[order]
    user_of = ep_user[ep_of]

    # Cut each user's sequence to its length, dropping the earliest tokens.
    counts = np.bincount(user_of, minlength=n_users)
    starts = np.cumsum(counts) - counts
    pos = np.arange(len(user_of)) - starts[user_of]
    pos = pos - (counts - lengths)[user_of]
    kept = pos >= 0
    ep_of, items_all, roles_all = ep_of[kept], items_all[kept], roles_all[kept]
    user_of, pos = user_of[kept], pos[kept]

    steps = rng.integers(60, 7 * 86_400, size=len(user_of), dtype=np.int64)
    csum = np.cumsum(steps)
    user_start = np.cumsum(lengths) - lengths
    base = np.concatenate([[0], csum])[user_start]
    t0 = 1_500_000_000 + rng.integers(0, 30_000_000, size=n_users, dtype=np.int64)
    timestamps = (t0[user_of] + csum - base[user_of]).astype(np.float64)

    user_ids = np.array([str(i + 1) for i in range(n_users)], dtype=object)
    item_ids = np.array([str(i + 1) for i in range(config.n_items)], dtype=object)
    log = pd.DataFrame({"user": user_ids[user_of], "item": item_ids[items_all],
                        "timestamp": timestamps})
    pathways = _ground_truth(ep_is_last[ep_of], roles_all, pos, user_of, ep_shape[ep_of],
                             items_all, user_ids, item_ids, n_users)
    return SyntheticLog(log=log, pathways=pathways, config=config)


def _noise_counts(rng: np.random.Generator, n_signal: np.ndarray, shape: np.ndarray,
                  config: SyntheticConfig) -> np.ndarray:
    """Noise behaviors per episode: geometric per signal token, capped so an episode fits."""
    if config.noise == 0.0:
        return np.zeros_like(n_signal)
    n = rng.negative_binomial(n_signal, 1.0 - config.noise)
    n = np.where(shape == SHAPES.index("casual"), np.maximum(n, len(_CASUAL_GAPS)), n)
    return np.minimum(n, config.min_len - n_signal).astype(np.int64)


def _signal_items(shape: str, n: int, st: ThemeStructure, rng: np.random.Generator) -> np.ndarray:
    """int64 [n, tokens]: the signal items of ``n`` episodes of one shape, target last."""
    n_themes = len(st.themes)
    if shape == "casual":
        x = rng.integers(0, len(st.theme_of), size=n)
        return np.stack([x, x, x, st.partner[x]], axis=1)
    theme = rng.integers(0, n_themes, size=n)
    if shape == "correlated":
        return _theme_run(st, theme, 4, rng)
    new_theme = (theme + rng.integers(1, n_themes, size=n)) % n_themes
    return np.concatenate([_theme_run(st, theme, 3, rng), _theme_run(st, new_theme, 4, rng)],
                          axis=1)


def _theme_run(st: ThemeStructure, theme: np.ndarray, k: int,
               rng: np.random.Generator) -> np.ndarray:
    """int64 [n, k]: k consecutive items of each theme from a random start."""
    sizes = np.array([len(t) for t in st.themes], dtype=np.int64)
    table = np.zeros((len(st.themes), int(sizes.max())), dtype=np.int64)
    for t, members in enumerate(st.themes):
        table[t, : len(members)] = members
    start = (rng.random(len(theme)) * sizes[theme]).astype(np.int64)
    cols = (start[:, None] + np.arange(k)[None, :]) % sizes[theme][:, None]
    return table[theme[:, None], cols]


def _ground_truth(is_last: np.ndarray, roles: np.ndarray, pos: np.ndarray, user_of: np.ndarray,
                  shape_of: np.ndarray, items: np.ndarray, user_ids: np.ndarray,
                  item_ids: np.ndarray, n_users: int) -> dict[str, dict[str, Any]]:
    """Pathway positions, shape and target of each user's last item (tokens sorted by user)."""
    on_path = is_last & (roles == _PATH)
    path_pos = pos[on_path].reshape(n_users, PATHWAY_LEN).tolist()
    target_mask = is_last & (roles == _TARGET)
    targets = item_ids[items[target_mask]]
    shapes = shape_of[target_mask]
    old_mask = is_last & (roles == _OLD)
    old_users = user_of[old_mask][::PATHWAY_LEN].tolist()
    old_pos = pos[old_mask].reshape(-1, PATHWAY_LEN).tolist()
    out: dict[str, dict[str, Any]] = {}
    for u in range(n_users):
        out[str(user_ids[u])] = {"shape": SHAPES[int(shapes[u])], "positions": path_pos[u],
                                 "target": str(targets[u])}
    for u, p in zip(old_users, old_pos, strict=True):
        out[str(user_ids[u])]["old_positions"] = p
    return out


def planted_rule(log: SyntheticLog) -> dict[str, str]:
    """Predict every user's last item from its planted pathway alone (the oracle to beat).

    correlated / drifted: the theme successor of the last pathway item; casual: the partner
    of the recurring item. It is right for every user by construction; tests use it to check
    that the ground truth really explains the targets.
    """
    st = theme_structure(log.config)
    seqs = log.log.groupby("user", sort=False)["item"].agg(list).to_dict()
    out: dict[str, str] = {}
    for user, info in log.pathways.items():
        last = seqs[user][info["positions"][-1]]
        out[user] = st.partner_of(last) if info["shape"] == "casual" else st.next_in_theme(last)
    return out


def parse_synthetic_spec(spec: str) -> SyntheticConfig:
    """``"synthetic"`` or ``"synthetic:n_users=500,seed=3,shapes=casual+drifted"`` -> config."""
    valid = {f.name: f for f in fields(SyntheticConfig)}
    valid_list = ", ".join(valid)
    text = spec.strip()
    head, sep, rest = text.partition(":")
    if head.strip().lower() != "synthetic":
        raise DataError(f"{spec!r} is not a synthetic spec; write 'synthetic' or "
                        f"'synthetic:key=value,...' with keys {valid_list}")
    kwargs: dict[str, Any] = {}
    for part in rest.split(",") if sep and rest.strip() else []:
        key, eq, value = (s.strip() for s in part.partition("="))
        if key not in valid:
            raise DataError(f"synthetic spec {spec!r}: unknown key {key!r}; valid keys: "
                            f"{valid_list}")
        if not eq or not value:
            raise DataError(f"synthetic spec {spec!r}: key {key!r} needs a value (key=value)")
        kwargs[key] = _parse_value(spec, key, value)
    return SyntheticConfig(**kwargs)


def _parse_value(spec: str, key: str, value: str) -> Any:
    if key == "shapes":
        return tuple(s.strip() for s in value.replace("|", "+").split("+"))
    kind = float if key == "noise" else int
    try:
        return kind(value)
    except ValueError:
        raise DataError(f"synthetic spec {spec!r}: {key}={value!r} is not a valid "
                        f"{kind.__name__}; valid keys: "
                        f"{', '.join(f.name for f in fields(SyntheticConfig))}") from None


def synthetic_interactions(**settings: Any) -> pd.DataFrame:
    """The planted-pathway log as a DataFrame of ``user_id``, ``item_id``, ``timestamp``.

    ``settings`` are :class:`SyntheticConfig`'s fields (``n_users``, ``seed``, ...), the same
    as in a ``synthetic:key=value`` source.
    """
    try:
        config = SyntheticConfig(**settings)
    except TypeError as exc:
        raise DataError(f"synthetic_interactions: {exc}") from None
    log = generate(config).log
    return log.rename(columns={"user": "user_id", "item": "item_id"})
