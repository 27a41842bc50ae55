"""Call arguments: Tasks anywhere in them are dependencies, replaced by their values as the same types (14.9)."""

from __future__ import annotations

from collections import OrderedDict, defaultdict, namedtuple

import gpuctx

TIMEOUT = 10
Pair = namedtuple("Pair", "left right")


class AttrDict(dict):
    __getattr__ = dict.__getitem__


def test_named_tuples_and_dict_subclasses_keep_their_types(fresh):
    two = gpuctx.gpu_task(model="a", vram="1GB")(lambda: 2)
    seen = gpuctx.gpu_task(model="b", vram="1GB")(lambda *args: args)
    d = defaultdict(list, x=two())
    res = seen(Pair(two(), 3), d, AttrDict(y=two()), OrderedDict(z=two())).result(TIMEOUT)
    assert res[0] == Pair(2, 3) and type(res[0]) is Pair
    assert type(res[1]) is defaultdict and res[1]["x"] == 2 and res[1]["missing"] == []
    assert type(res[2]) is AttrDict and res[2].y == 2
    assert type(res[3]) is OrderedDict and res[3]["z"] == 2


def test_a_plain_named_tuple_on_the_cpu_path_is_passed_as_it_is(fresh):
    p = Pair(1, 2)
    echo = gpuctx.gpu_task(model="m", vram="1GB", device="cpu")(lambda x: x)
    assert echo(p).result(TIMEOUT) is p


def test_self_referencing_and_deeply_nested_arguments_are_no_recursion_error(fresh):
    two = gpuctx.gpu_task(model="a", vram="1GB")(lambda: 2)
    echo = gpuctx.gpu_task(model="b", vram="1GB")(lambda x: x)
    loop: list = [1]
    loop.append(loop)
    assert echo(loop).result(TIMEOUT) is loop
    deep: list = [two()]
    for _ in range(3000):
        deep = [deep]
    out = echo(deep).result(TIMEOUT)
    for _ in range(3000):
        out = out[0]
    assert out == [2]
