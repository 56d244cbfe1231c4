import collections

import numpy as np
import pytest

from qsharp_jax.tasks import star_graph as sg


def _paths(graph, start, goal):
    """Every directed path start -> goal (DFS; star graphs are trees)."""
    children = collections.defaultdict(list)
    for u, v in graph.edges:
        children[u].append(v)
    out, stack = [], [(start,)]
    while stack:
        p = stack.pop()
        if p[-1] == goal:
            out.append(p)
        stack.extend(p + (c,) for c in children[p[-1]] if c not in p)
    return out


@pytest.mark.parametrize("degree,path_len", [(2, 5), (5, 5), (3, 8), (1, 2), (4, 2)])
def test_invariants(degree, path_len):
    spec = sg.GraphSpec(degree, path_len, 50)
    for g in sg.generate_many(spec, 200, seed=3):
        out_deg = collections.Counter(u for u, _ in g.edges)
        in_deg = collections.Counter(v for _, v in g.edges)
        assert len(g.edges) == spec.num_edges == degree * (path_len - 1)
        assert out_deg[g.source] == degree and in_deg[g.source] == 0
        assert all(c == 1 for n, c in out_deg.items() if n != g.source)  # arms are chains
        assert all(c == 1 for c in in_deg.values())
        nodes = {x for e in g.edges for x in e}
        assert len(nodes) == spec.nodes_needed and all(0 <= x < 50 for x in nodes)
        assert g.goal != g.source and g.path[0] == g.source and g.path[-1] == g.goal
        assert len(g.path) == path_len
        assert all(e in set(g.edges) for e in zip(g.path[:-1], g.path[1:]))
        assert _paths(g, g.source, g.goal) == [g.path]  # the unique source-to-goal path


def test_edges_are_shuffled_and_deterministic_by_seed():
    spec = sg.GraphSpec(5, 5, 50)
    a, b, c = (sg.generate_many(spec, 50, seed=s) for s in (7, 7, 8))
    assert a == b and a != c
    # the path's first edge is not always listed first: the order is shuffled
    firsts = [g.edges.index((g.path[0], g.path[1])) for g in a]
    assert len(set(firsts)) > 5


@pytest.mark.parametrize("degree,path_len", [(2, 5), (5, 5), (3, 8)])
def test_tokenization_round_trip_and_lengths(degree, path_len):
    spec = sg.GraphSpec(degree, path_len, 50)
    tok = sg.Tokenizer(50)
    for g in sg.generate_many(spec, 100, seed=1):
        prefix, target = tok.encode_graph(g)
        assert len(prefix) == spec.prefix_len == 4 * spec.num_edges + 4
        assert len(target) == spec.target_len == 2 * path_len - 1
        assert tok.decode(prefix + target) == g.text()
        assert sg.StarGraph.parse(tok.decode(prefix + target)) == g
        assert prefix[-1] == tok.sep_ids["="] and target[0] == g.source and target[-1] == g.goal
        assert all(0 <= i < tok.vocab_size for i in prefix + target)
    assert tok.encode("12,3|3,40/12,40=12,3,40") == [12, 50, 3, 51, 3, 50, 40, 52, 12, 50, 40, 53, 12, 50, 3, 50, 40]


@pytest.mark.parametrize(
    "args,message",
    [
        ((0, 5, 50), r"degree=0: the source needs at least one arm"),
        ((2, 1, 50), r"path_len=1: .* needs >= 2"),
        ((5, 12, 50), r"needs 56 distinct nodes .* but num_nodes=50"),
        ((2.0, 5, 50), r"degree must be an integer"),
    ],
)
def test_impossible_parameters_rejected(args, message):
    with pytest.raises(sg.StarGraphError, match=message):
        sg.GraphSpec(*args)


def test_malformed_text_and_tokens_rejected():
    tok = sg.Tokenizer(50)
    with pytest.raises(sg.StarGraphError, match="not a node number"):
        tok.encode("1,2;3")
    with pytest.raises(sg.StarGraphError, match="outside the vocabulary"):
        tok.encode("1,77")
    with pytest.raises(sg.StarGraphError, match="outside the vocabulary"):
        tok.decode([54])
    with pytest.raises(sg.StarGraphError, match="every edge needs exactly two nodes"):
        sg.StarGraph.parse("1,2|3/1,3=1,2")
    with pytest.raises(sg.StarGraphError, match="not a star-graph line"):
        sg.StarGraph.parse("1,2|2,3/1,3")


def test_splits_written_once_and_reused(tmp_path):
    spec = sg.GraphSpec(2, 5, 50)
    sizes = dict(pretrain=30, posttrain=20, test=10)
    first = sg.load_or_write_splits(str(tmp_path), spec, sizes, seed=5)
    mtime = (tmp_path / "test.jsonl").stat().st_mtime_ns
    again = sg.load_or_write_splits(str(tmp_path), spec, sizes, seed=5)
    assert first == again and (tmp_path / "test.jsonl").stat().st_mtime_ns == mtime
    assert {len(v) for v in first.values()} == {30, 20, 10}
    texts = [g.text() for s in sg.SPLITS for g in first[s]]
    assert len(set(texts)) == len(texts)
    with pytest.raises(sg.StarGraphError, match="holds star-graph splits"):
        sg.load_or_write_splits(str(tmp_path), spec, sizes, seed=6)


def test_exact_match():
    targets = np.array([[1, 50, 2], [3, 50, 4]])
    completions = np.array([[1, 50, 2, 9], [3, 50, 5, 9]])
    assert sg.exact_match(targets, completions).tolist() == [True, False]
