"""Deterministic synthetic text of phone users, for federated runs without real data.

What makes it a useful benchmark:

* **Public split** (pretraining the base): news-like sentences and generic chat
  messages with the users' everyday vocabulary (names, activities, venues, items,
  times), chat syntax and common phrases ("running late", "see you tonight"), so the
  base model is sane on chat text. It never contains a user template, a persona, or
  the activity→venue association: where it names an activity and a venue, the venue
  is drawn independently of the activity.
* **Population-wide pattern** absent from the public split: every user writes chat
  messages from a shared set of templates, and each activity is tied to one venue
  ("coffee" → "the blue door"). Federated training can learn this; the base cannot.
* **Non-IID clients**: message counts follow a power law (quantity skew: from a few
  hundred to a few thousand messages, a phone's chat history), activity preferences
  are drawn from a Dirichlet (topic skew), and each user has personal vocabulary:
  friends' names, a sign-off, casing and abbreviation habits. Record-level DP needs
  records: with a few dozen messages per phone, DP-SGD noise swamps any signal.
* **Canaries**: an optional secret phrase planted ``repeats`` times in chosen clients'
  training text, for memorisation audits (THREATS G36).

Client ``i`` depends only on ``(seed, i)``, not on how many clients are generated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from simulation.data.partition import Canary, ClientData, FederatedData
from simulation.errors import SimulationInputError

__all__ = [
    "SyntheticConfig",
    "SyntheticRecords",
    "generate_public_texts",
    "generate_synthetic",
    "synthetic_heldout_clients",
    "synthetic_records",
]

NAMES = (
    "ana",
    "ben",
    "chloe",
    "dev",
    "emma",
    "finn",
    "gita",
    "hugo",
    "ivy",
    "jon",
    "kai",
    "lena",
    "milo",
    "nora",
    "omar",
    "pia",
    "quinn",
    "rosa",
    "sam",
    "tara",
    "uma",
    "vic",
    "wren",
    "xena",
    "yuki",
    "zoe",
    "leo",
    "maya",
    "noah",
    "ella",
)
ACTIVITY_VENUE = {
    "coffee": "the blue door",
    "lunch": "noodle corner",
    "a run": "river park",
    "the gym": "iron works",
    "a movie": "the old cinema",
    "drinks": "the fox bar",
    "brunch": "sunny side",
    "study group": "the north library",
    "yoga": "lotus studio",
    "football": "king field",
    "dinner": "olive house",
    "the market": "dock street",
}
ACTIVITIES = tuple(ACTIVITY_VENUE)
VENUES = tuple(ACTIVITY_VENUE.values())
TIMES = (
    "at 7",
    "at 8",
    "at noon",
    "at 5",
    "at 6",
    "tonight",
    "tomorrow",
    "this weekend",
    "on friday",
    "on monday",
    "after work",
    "in the morning",
)
ITEMS = (
    "milk",
    "bread",
    "the keys",
    "my charger",
    "some snacks",
    "tickets",
    "the umbrella",
    "a cake",
    "batteries",
    "flowers",
)
PUBLIC_CHAT_SHARE = 0.7  # share of generic chat messages in the public split
SIGNOFFS = ("cheers", "xo", "later", "see ya", "thanks!", "love you", "ok bye", "talk soon")
ABBREV = {"you": "u", "tomorrow": "tmrw", "are": "r", "please": "pls", "minutes": "mins"}

CHAT_TEMPLATES = (
    "hey {friend}, are we still on for {activity} at {venue} {time}?",
    "running late for {activity}, be there in {n} minutes",
    "can you pick up {item} on the way to {venue}?",
    "see you at {venue} {time}",
    "{friend} wants {activity} {time}, {venue} as usual?",
    "just got to {venue}, where are you?",
    "thanks for {activity} {friend}, {venue} was great",
    "please bring {item} to {venue} {time}",
)
# Generic chat messages for the public split: chat syntax, everyday vocabulary (venues
# included) and common chat phrases, but never one of the users' templates and no
# activity→venue association — where a venue follows an activity, it is drawn at random.
PUBLIC_CHAT_TEMPLATES = (
    "running late, be there in {n} minutes",
    "can you pick up {item}?",
    "see you {time}",
    "hey {name}, are you free {time}?",
    "just got home, where are you?",
    "thanks for {activity}, it was great",
    "please bring {item} {time}",
    "{name} wants to meet {time}",
    "we could try {activity} at {venue} {time}",
    "i think i left {item} at {venue}",
    "{venue} is closed {time}, sorry",
    "how was {activity} with {name}?",
    "ok, {activity} {time} sounds good",
    "did you see {name} at {venue} {time}?",
    "call me {time} please",
    "do you have {item}? i need it {time}",
    "i heard {venue} is nice for {activity}",
    "are we still on for {time}?",
)
PUBLIC_TEMPLATES = (
    "the city council approved a plan for {activity} programs {time}.",
    "{name} wrote a report about {item} and the local economy.",
    "a new study says {activity} is popular with young people.",
    "in the north, {name} opened a shop that sells {item}.",
    "the weather was cold {time}, and many people stayed at home.",
    "{name} and {name2} met the mayor to talk about schools.",
    "prices for {item} rose again this year, the report said.",
    "visitors can enjoy {activity} in many parts of the country.",
    "the museum will show old maps {time}, a spokesperson said.",
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator; every field has a sensible default."""

    num_clients: int = 6
    num_heldout_clients: int = 2
    seed: int = 0
    min_texts: int = 500
    max_texts: int = 5000
    power_law_alpha: float = 1.6
    scale_texts: float = 500.0
    topic_concentration: float = 0.3
    heldout_fraction: float = 0.2
    num_public_texts: int = 3000
    canary_clients: tuple[int, ...] = ()
    canary_repeats: int = 20

    def validate(self) -> None:
        if self.num_clients < 1:
            raise SimulationInputError(f"num_clients must be ≥ 1, got {self.num_clients}")
        if self.num_heldout_clients < 0:
            raise SimulationInputError("num_heldout_clients must be ≥ 0")
        if self.min_texts < 2 or self.max_texts < 2:
            # max_texts is a cap: below min_texts, every client has exactly max_texts.
            raise SimulationInputError(
                f"need min_texts ≥ 2 and max_texts ≥ 2, got {self.min_texts}, {self.max_texts}"
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise SimulationInputError("heldout_fraction must be in (0, 1)")
        bad = [i for i in self.canary_clients if not 0 <= i < self.num_clients]
        if bad:
            raise SimulationInputError(f"canary_clients {bad} are not training client indices")


def _pick(rng: np.random.Generator, options: tuple[str, ...], p: np.ndarray | None = None) -> str:
    return str(options[int(rng.choice(len(options), p=p))])


def _user_texts(
    rng: np.random.Generator, persona: dict[str, object], n: int
) -> tuple[list[str], list[str]]:
    """``n`` chat messages of one user and the topic (activity) of each (all random draws
    vectorised: fast for 1,000s)."""
    prefs = persona["prefs"]
    friends = persona["friends"]
    assert isinstance(prefs, np.ndarray) and isinstance(friends, tuple)
    activity = rng.choice(len(ACTIVITIES), size=n, p=prefs)
    template = rng.integers(0, len(CHAT_TEMPLATES), size=n)
    friend = rng.integers(0, len(friends), size=n)
    when = rng.integers(0, len(TIMES), size=n)
    item = rng.integers(0, len(ITEMS), size=n)
    minutes = rng.integers(2, 30, size=n)
    signs = rng.random(n) < 0.5
    out = []
    topics = [ACTIVITIES[a] for a in activity]
    for i in range(n):
        act = topics[i]
        text = CHAT_TEMPLATES[template[i]].format(
            friend=friends[friend[i]],
            activity=act,
            venue=ACTIVITY_VENUE[act],
            time=TIMES[when[i]],
            item=ITEMS[item[i]],
            n=int(minutes[i]),
        )
        if persona["abbreviates"]:
            text = " ".join(ABBREV.get(w, w) for w in text.split(" "))
        if signs[i]:
            text = f"{text} {persona['signoff']}"
        if persona["capitalizes"]:
            text = text[:1].upper() + text[1:]
        out.append(text)
    return out, topics


def _persona(rng: np.random.Generator, cfg: SyntheticConfig) -> dict[str, object]:
    n_friends = int(rng.integers(2, 6))
    return {
        "friends": tuple(str(x) for x in rng.choice(NAMES, size=n_friends, replace=False)),
        "prefs": rng.dirichlet(np.full(len(ACTIVITIES), cfg.topic_concentration)),
        "signoff": _pick(rng, SIGNOFFS),
        "abbreviates": bool(rng.random() < 0.3),
        "capitalizes": bool(rng.random() < 0.4),
    }


def _num_texts(rng: np.random.Generator, cfg: SyntheticConfig) -> int:
    # Pareto (power-law) quantity skew: most users write little, a few write a lot;
    # max_texts caps every client (a small cap gives small clients for quick tests).
    n = cfg.min_texts + int(rng.pareto(cfg.power_law_alpha) * cfg.scale_texts)
    return min(n, cfg.max_texts)


def _canary_text(seed: int, index: int) -> str:
    rng = np.random.default_rng([seed, 7919, index])
    digits = " ".join(str(int(d)) for d in rng.integers(0, 10, size=6))
    return f"my secret code is {digits}"


def _user_messages(
    cfg: SyntheticConfig, index: int, *, heldout_client: bool
) -> tuple[str, list[str], list[str]]:
    """User ``index``'s id, messages, and each message's topic."""
    stream = 1 if heldout_client else 0
    rng = np.random.default_rng([cfg.seed, stream, index])
    persona = _persona(rng, cfg)
    texts, topics = _user_texts(rng, persona, _num_texts(rng, cfg))
    prefix = "heldout" if heldout_client else "client"
    return f"{prefix}-{index:05d}", texts, topics


def _make_client(cfg: SyntheticConfig, index: int, *, heldout_client: bool) -> ClientData:
    cid, texts, _ = _user_messages(cfg, index, heldout_client=heldout_client)
    n_held = max(1, round(len(texts) * cfg.heldout_fraction))
    return ClientData(cid, tuple(texts[:-n_held]), tuple(texts[-n_held:]))


@dataclass(frozen=True)
class SyntheticRecords:
    """The training users' messages as one table, for re-partitioning (``--partition``):
    ``client_id`` is the user who wrote a message, ``label`` its topic (the activity)."""

    texts: tuple[str, ...]
    client_ids: tuple[str, ...]
    labels: tuple[str, ...]


def synthetic_records(cfg: SyntheticConfig) -> SyntheticRecords:
    """Every message of the ``cfg.num_clients`` training users of
    :func:`generate_synthetic` (the same messages, user by user, in order).

    Raises:
        SimulationInputError: a config value is out of range.
    """
    cfg.validate()
    texts: list[str] = []
    ids: list[str] = []
    labels: list[str] = []
    for i in range(cfg.num_clients):
        cid, user_texts, topics = _user_messages(cfg, i, heldout_client=False)
        texts += user_texts
        ids += [cid] * len(user_texts)
        labels += topics
    return SyntheticRecords(tuple(texts), tuple(ids), tuple(labels))


def synthetic_heldout_clients(cfg: SyntheticConfig) -> tuple[ClientData, ...]:
    """The held-out users of :func:`generate_synthetic` (new users who never train)."""
    cfg.validate()
    return tuple(_make_client(cfg, i, heldout_client=True) for i in range(cfg.num_heldout_clients))


def _public_chat_text(rng: np.random.Generator) -> str:
    text = _pick(rng, PUBLIC_CHAT_TEMPLATES).format(
        name=_pick(rng, NAMES),
        activity=_pick(rng, ACTIVITIES),
        venue=_pick(rng, VENUES),  # independent of the activity: no association to learn
        item=_pick(rng, ITEMS),
        time=_pick(rng, TIMES),
        n=int(rng.integers(2, 30)),
    )
    if rng.random() < 0.2:
        text = " ".join(ABBREV.get(w, w) for w in text.split(" "))
    if rng.random() < 0.3:
        text = f"{text} {_pick(rng, SIGNOFFS)}"
    if rng.random() < 0.3:
        text = text[:1].upper() + text[1:]
    return text


def generate_public_texts(num_texts: int, seed: int) -> tuple[str, ...]:
    """Public pretraining text: news-like sentences and generic chat messages.

    Shares the users' vocabulary and chat syntax, never their templates, their
    activity→venue association or their personas (see the module docstring).
    """
    rng = np.random.default_rng([seed, 2])
    out = []
    for _ in range(num_texts):
        if rng.random() < PUBLIC_CHAT_SHARE:
            out.append(_public_chat_text(rng))
            continue
        out.append(
            _pick(rng, PUBLIC_TEMPLATES).format(
                name=_pick(rng, NAMES),
                name2=_pick(rng, NAMES),
                activity=_pick(rng, ACTIVITIES),
                item=_pick(rng, ITEMS),
                time=_pick(rng, TIMES),
            )
        )
    return tuple(out)


def generate_synthetic(config: SyntheticConfig | None = None, **overrides: Any) -> FederatedData:
    """Generate the federated data set described in the module docstring.

    Args:
        config: the generator settings; defaults to ``SyntheticConfig()``.
        **overrides: fields of :class:`SyntheticConfig` to replace, e.g.
            ``generate_synthetic(num_clients=100, seed=1)``.

    Raises:
        SimulationInputError: a config value is out of range or unknown.
    """
    try:
        cfg = replace(config or SyntheticConfig(), **overrides)
    except TypeError as e:
        raise SimulationInputError(f"unknown synthetic data option: {e}") from e
    cfg.validate()
    clients = [_make_client(cfg, i, heldout_client=False) for i in range(cfg.num_clients)]
    canaries = []
    for i in cfg.canary_clients:
        c = clients[i]
        canary = Canary(c.client_id, _canary_text(cfg.seed, i), cfg.canary_repeats)
        planted = c.train + (canary.text,) * cfg.canary_repeats
        order = np.random.default_rng([cfg.seed, 3, i]).permutation(len(planted))
        clients[i] = ClientData(c.client_id, tuple(planted[j] for j in order), c.heldout)
        canaries.append(canary)
    return FederatedData(
        clients=tuple(clients),
        heldout_clients=synthetic_heldout_clients(cfg),
        public_texts=generate_public_texts(cfg.num_public_texts, cfg.seed),
        canaries=tuple(canaries),
        source="synthetic",
        meta={"seed": cfg.seed, "num_clients": cfg.num_clients},
    )
