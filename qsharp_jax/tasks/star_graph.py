"""The star-graph task (spec 5.1-5.2): graphs, their text form, a small tokenizer, splits.

G(degree, path_len, num_nodes): a source s with ``degree`` arms of ``path_len - 1`` nodes each;
one arm ends in the goal g. Node labels are distinct random integers in [0, num_nodes).
The text line is ``u1,v1|u2,v2|...|uE,vE/s,g=p1,p2,...,pL``: E = degree * (path_len - 1)
directed parent->child edges in shuffled order, then source and goal, then the path from s
to g *including s* (p1 = s, pL = g). The prefix (model input) ends with ``=``; the target is
the path.

Tokenizer: every node number and every separator (``,`` ``|`` ``/`` ``=``) is one token (node
v is id v; the separators follow), so the prefix has 4E + 4 tokens and the target 2L - 1.

Splits (pretrain / posttrain / test) are drawn from one seeded stream, written once as JSONL
and read back on every later run (:func:`load_or_write_splits`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Sequence

import numpy as np

SEPARATORS = (",", "|", "/", "=")
SPLITS = ("pretrain", "posttrain", "test")


class StarGraphError(ValueError):
    """Impossible or malformed star-graph parameters or text."""


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    degree: int
    path_len: int
    num_nodes: int = 50

    def __post_init__(self):
        validate(self.degree, self.path_len, self.num_nodes)

    @property
    def num_edges(self) -> int:
        return self.degree * (self.path_len - 1)

    @property
    def nodes_needed(self) -> int:
        return 1 + self.num_edges

    @property
    def prefix_len(self) -> int:
        return 4 * self.num_edges + 4

    @property
    def target_len(self) -> int:
        return 2 * self.path_len - 1


def validate(degree: int, path_len: int, num_nodes: int) -> None:
    for name, v in (("degree", degree), ("path_len", path_len), ("num_nodes", num_nodes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise StarGraphError(f"{name} must be an integer, got {v!r}.")
    if degree < 1:
        raise StarGraphError(f"degree={degree}: the source needs at least one arm (degree >= 1).")
    if path_len < 2:
        raise StarGraphError(
            f"path_len={path_len}: the path counts nodes including the source and the goal, so it needs >= 2."
        )
    needed = 1 + degree * (path_len - 1)
    if needed > num_nodes:
        raise StarGraphError(
            f"G(degree={degree}, path_len={path_len}) needs {needed} distinct nodes (1 + degree * (path_len - 1)) "
            f"but num_nodes={num_nodes}: raise num_nodes or shrink the graph."
        )


@dataclasses.dataclass(frozen=True)
class StarGraph:
    edges: tuple  # ((parent, child), ...) in shuffled order
    source: int
    goal: int
    path: tuple  # (source, ..., goal)

    def prefix_text(self) -> str:
        return "|".join(f"{u},{v}" for u, v in self.edges) + f"/{self.source},{self.goal}="

    def target_text(self) -> str:
        return ",".join(str(v) for v in self.path)

    def text(self) -> str:
        return self.prefix_text() + self.target_text()

    def to_json(self) -> dict:
        return dict(text=self.text())

    @classmethod
    def parse(cls, text: str) -> StarGraph:
        try:
            head, target = text.split("=")
            edge_part, query = head.split("/")
            edges = tuple(tuple(int(x) for x in e.split(",")) for e in edge_part.split("|"))
            source, goal = (int(x) for x in query.split(","))
            path = tuple(int(x) for x in target.split(","))
        except ValueError as e:
            raise StarGraphError(f"not a star-graph line ({e}): {text!r}") from None
        if any(len(e) != 2 for e in edges):
            raise StarGraphError(f"every edge needs exactly two nodes: {text!r}")
        return cls(edges=edges, source=source, goal=goal, path=path)


def generate(spec: GraphSpec, rng: np.random.Generator) -> StarGraph:
    """One graph of ``spec``: distinct labels, source s, goal g != s, the s->g path of
    ``path_len`` nodes, ``degree - 1`` distractor arms of ``path_len - 1`` fresh nodes."""
    nodes = rng.permutation(spec.num_nodes)[: spec.nodes_needed].tolist()
    source, rest = nodes[0], nodes[1:]
    arm = spec.path_len - 1
    arms = [rest[i * arm : (i + 1) * arm] for i in range(spec.degree)]
    path = (source, *arms[0])  # arm 0 ends in the goal; the others are distractors
    edges = [(a, b) for chain in ([source, *a] for a in arms) for a, b in itertools.pairwise(chain)]
    order = rng.permutation(len(edges))
    return StarGraph(edges=tuple(edges[i] for i in order), source=source, goal=path[-1], path=path)


def generate_many(spec: GraphSpec, count: int, seed: int) -> list[StarGraph]:
    rng = np.random.default_rng(seed)
    return [generate(spec, rng) for _ in range(count)]


# ---- tokenizer ---------------------------------------------------------------------------


class Tokenizer:
    """Node v -> id v; ``,`` ``|`` ``/`` ``=`` -> num_nodes .. num_nodes + 3. No BOS/EOS."""

    def __init__(self, num_nodes: int):
        self.num_nodes = num_nodes
        self.sep_ids = {s: num_nodes + i for i, s in enumerate(SEPARATORS)}
        self.vocab_size = num_nodes + len(SEPARATORS)
        self.pad_id = self.sep_ids[","]  # any valid id: pads are masked everywhere

    def encode(self, text: str) -> list[int]:
        ids, number = [], ""
        for ch in text:
            if ch.isdigit():
                number += ch
                continue
            if number:
                ids.append(self._node(number))
                number = ""
            if ch not in self.sep_ids:
                raise StarGraphError(f"character {ch!r} is not a node number or one of {SEPARATORS}: {text!r}")
            ids.append(self.sep_ids[ch])
        if number:
            ids.append(self._node(number))
        return ids

    def _node(self, number: str) -> int:
        v = int(number)
        if v >= self.num_nodes:
            raise StarGraphError(f"node {v} is outside the vocabulary (num_nodes={self.num_nodes}).")
        return v

    def decode(self, ids: Sequence[int]) -> str:
        inv = {i: s for s, i in self.sep_ids.items()}
        out = []
        for i in ids:
            i = int(i)
            if 0 <= i < self.num_nodes:
                out.append(str(i))
            elif i in inv:
                out.append(inv[i])
            else:
                raise StarGraphError(f"token id {i} is outside the vocabulary ({self.vocab_size}).")
        return "".join(out)

    def encode_graph(self, graph: StarGraph) -> tuple[list[int], list[int]]:
        """(prefix ids, target ids), encoded separately as the authors do."""
        return self.encode(graph.prefix_text()), self.encode(graph.target_text())


def encode_split(tok: Tokenizer, graphs: Sequence[StarGraph]) -> tuple[np.ndarray, np.ndarray]:
    """[N, prefix_len] and [N, target_len] int32 arrays (all graphs of one spec have equal lengths)."""
    pairs = [tok.encode_graph(g) for g in graphs]
    return np.asarray([p for p, _ in pairs], np.int32), np.asarray([t for _, t in pairs], np.int32)


def exact_match(targets: np.ndarray, completions: np.ndarray) -> np.ndarray:
    """[N] bool: the completion equals the whole target path (commas included)."""
    n = targets.shape[1]
    return np.all(np.asarray(completions)[:, :n] == targets, axis=1)


# ---- splits on disk ----------------------------------------------------------------------


def split_path(directory: str, split: str) -> str:
    return os.path.join(directory, f"{split}.jsonl")


def _write_jsonl(path: str, graphs: Sequence[StarGraph]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for g in graphs:
            f.write(json.dumps(g.to_json()) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[StarGraph]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(StarGraph.parse(json.loads(line)["text"]))
            except (StarGraphError, KeyError, json.JSONDecodeError) as e:
                raise StarGraphError(f"{path}:{n}: {e}") from None
    return out


def load_or_write_splits(directory: str, spec: GraphSpec, sizes: dict[str, int], seed: int) -> dict[str, list]:
    """The three splits of ``spec``: read from ``directory`` when it holds them for the same
    (spec, sizes, seed), else generated from one seeded stream (pretrain, posttrain, test in
    that order) and written. A directory holding other splits is an error, not overwritten."""
    os.makedirs(directory, exist_ok=True)
    meta = dict(spec=dataclasses.asdict(spec), sizes={s: int(sizes[s]) for s in SPLITS}, seed=int(seed))
    meta_path = os.path.join(directory, "splits.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            saved = json.load(f)
        if saved != meta:
            raise StarGraphError(
                f"{directory} holds star-graph splits of {saved}, not {meta}: use another output directory."
            )
        return {s: read_jsonl(split_path(directory, s)) for s in SPLITS}
    rng = np.random.default_rng(seed)
    splits = {s: [generate(spec, rng) for _ in range(sizes[s])] for s in SPLITS}
    for s in SPLITS:
        _write_jsonl(split_path(directory, s), splits[s])
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)  # last: its presence means the splits are complete
    return splits
