"""Topological ordering of an ONNX graph's nodes (the fp16 converter's inserted Casts break the order)."""

from __future__ import annotations

from typing import Any

__all__ = ["toposort"]


def toposort(graph: Any) -> None:
    """Reorder ``graph.node`` topologically in place (stable: keeps the original order where it can)."""
    nodes = list(graph.node)
    produced = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    deps: list[set[int]] = []
    for i, n in enumerate(nodes):
        deps.append({produced[x] for x in n.input if x in produced and produced[x] != i})
    users: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    import heapq

    remaining = [len(d) for d in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise RuntimeError("the fp16 graph has a cycle; cannot sort it topologically (report this as a bug)")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
