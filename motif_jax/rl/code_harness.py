"""The programs that judge an assert-style code test, run inside two sandboxes (see ``motif_jax.rl.code_judge``).

The *solution* program is the model's code followed by :func:`_solution_serve`, which answers requests ("call f with
(2,)", "attribute x of object 3", ...) on a pipe; the *judge* program is :func:`_judge_main`, which runs the test
code with every name it takes from the solution bound to a proxy that sends such requests. Values cross as plain data
in the wire format of :func:`_wire_encode` / :func:`_wire_decode`, so every comparison of the test is made in the
judge, where no solution code ever ran.

Everything here also runs inside the sandboxes (embedded by source): it must be self-contained (imports inside) and
run on any Python >= 3.8. The names keep their leading underscore because they are defined in the solution's own
namespace, after its code, where public names could shadow the solution's.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from typing import Any

__all__ = ["judge_program", "solution_program"]


def _wire_encode(value, handle, depth=0):
    """JSON form of ``value``: plain data by value (exact builtin types; subclasses that keep their base's equality
    and the ``collections`` mappings as their base type; Fraction, Decimal), anything else as ``handle(value)``."""
    t = type(value)
    if value is None or t is bool or t is str or t is float:
        return value
    if t is int:
        return value if -(1 << 53) < value < (1 << 53) else {"I": format(value, "x")}
    if depth > 100:
        raise ValueError("value nested too deeply")

    def enc(v):
        return _wire_encode(v, handle, depth + 1)

    if t is list or t is tuple or t is set or t is frozenset:
        return {{list: "L", tuple: "T", set: "S", frozenset: "F"}[t]: [enc(v) for v in value]}
    if t is dict:
        return {"D": [[enc(k), enc(v)] for k, v in value.items()]}
    if t is bytes or t is bytearray:
        return {"B" if t is bytes else "A": value.hex()}
    if t is complex:
        return {"C": [value.real, value.imag]}
    if t.__name__ == "Fraction" and t.__module__ == "fractions":
        return {"Q": [enc(value.numerator), enc(value.denominator)]}
    if t.__name__ == "Decimal" and t.__module__ == "decimal":
        return {"M": str(value)}
    for base in (int, float, str, bytes, list, tuple, dict, set, frozenset):  # namedtuple, IntEnum, Counter ...
        if isinstance(value, base) and (t.__eq__ is base.__eq__ or t.__module__ == "collections"):
            return enc(base(value))
    return handle(value)


def _wire_decode(obj, ref, depth=0):
    """Inverse of :func:`_wire_encode` for JSON from anywhere: raises ValueError/TypeError on anything malformed;
    handles ``{"H": [id, class name]}`` and names ``{"N": name}`` become ``ref(tag, body)``."""
    t = type(obj)
    if obj is None or t is bool or t is int or t is float or t is str:
        return obj
    if t is not dict or len(obj) != 1 or depth > 100:
        raise ValueError("malformed value")
    ((tag, body),) = obj.items()

    def dec(v):
        return _wire_decode(v, ref, depth + 1)

    if tag in ("L", "T", "S", "F") and type(body) is list:
        return {"L": list, "T": tuple, "S": set, "F": frozenset}[tag](dec(v) for v in body)
    if tag == "D" and type(body) is list and all(type(kv) is list and len(kv) == 2 for kv in body):
        return {dec(k): dec(v) for k, v in body}
    if tag == "I" and type(body) is str and len(body) <= 100_000:
        return int(body, 16)
    if tag in ("B", "A") and type(body) is str:
        return (bytes if tag == "B" else bytearray).fromhex(body)
    if tag == "C" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(body[0], body[1])
    if tag == "Q" and type(body) is list and len(body) == 2:
        import fractions

        num, den = dec(body[0]), dec(body[1])
        if type(num) is not int or type(den) is not int:
            raise ValueError("malformed fraction")
        return fractions.Fraction(num, den)
    if tag == "M" and type(body) is str and len(body) <= 10_000:
        import decimal

        return decimal.Decimal(body)
    if (tag == "H" and type(body) is list and len(body) == 2 and type(body[0]) is int and type(body[1]) is str) or (
        tag == "N" and type(body) is str
    ):
        return ref(tag, body)
    raise ValueError("malformed value")


def _solution_serve(namespace, rfd, wfd):
    """The solution's side: answer the judge's requests against ``namespace`` until the request pipe closes.

    Runs after the solution's own code, in its (untrusted) process: whatever it sends is only data to be checked,
    and choosing what it sends is no more than choosing what the solution's functions return.
    """
    import builtins
    import json
    import os

    handles = []

    def keep(value):
        handles.append(value)
        name = type(value).__name__
        return {"H": [len(handles) - 1, name if type(name) is str else "?"]}

    def find(tag, body):
        if tag == "H":
            return handles[body[0]]
        if body in namespace:
            return namespace[body]
        if hasattr(builtins, body):
            return getattr(builtins, body)
        raise NameError(f"name {body!r} is not defined")

    reader, writer = os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb")
    for line in reader:
        op = None
        try:
            request = json.loads(line)
            op = request["op"]
            target = _wire_decode(request["obj"], find)
            if op == "call":
                args = [_wire_decode(a, find) for a in request["args"]]
                value = target(*args, **{k: _wire_decode(v, find) for k, v in request["kwargs"]})
            elif op == "getattr":
                value = getattr(target, request["name"])
            elif op == "iter":
                value = iter(target)
            elif op == "next":
                value = next(target)
            elif op == "getitem":
                value = target[_wire_decode(request["key"], find)]
            elif op == "len":
                value = len(target)
            elif op == "str":
                value = str(target)
            else:
                value = target
            reply = {"ok": _wire_encode(value, keep)}
        except StopIteration:
            reply = {"stop": True} if op == "next" else {"raise": ["StopIteration", ""]}
        except BaseException as e:  # noqa: BLE001 - SystemExit too: the judge decides what it means
            try:
                message = str(e)[:500]
            except BaseException:  # noqa: BLE001
                message = ""
            reply = {"raise": [type(e).__name__, message]}
        writer.write(json.dumps(reply).encode("utf-8") + b"\n")
        writer.flush()


def _judge_main(test_src, names, rfd, wfd):
    """The judge: run ``test_src`` with each of ``names`` bound to a proxy of the solution's object, then send the
    verdict (``pass``, ``fail``, or why the run could not be judged) as the last message on ``wfd``."""
    import builtins
    import json
    import operator
    import os

    reader, writer = os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb")
    spoiled = []  # (verdict, detail) overriding the test's outcome, even when the test swallows the exception

    class Unjudgeable(BaseException):
        """The solution is gone or sent something that cannot be judged (a BaseException: ``except Exception``
        in a test does not catch it)."""

    class SolutionError(Exception):
        """An exception of a class of the solution's own."""

    def give_up(verdict, detail):
        spoiled.append((verdict, detail))
        raise Unjudgeable(detail)

    def send(message):
        writer.write(json.dumps(message).encode("utf-8") + b"\n")
        writer.flush()

    def rpc(op, wire, **extra):
        if spoiled:
            raise Unjudgeable(spoiled[0][1])
        send(dict(extra, op=op, obj=wire))
        line = reader.readline()
        if not line:
            give_up("gone", "the verifier closed the channel")
        reply = json.loads(line)
        if "spoil" in reply:
            give_up(*reply["spoil"])
        if "stop" in reply:
            raise StopIteration
        if "raise" in reply:
            name, message = reply["raise"]
            if name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
                give_up("exited_early", "the solution raised " + name)
            cls = getattr(builtins, name, None)
            error = None
            if isinstance(cls, type) and issubclass(cls, Exception) and cls is not StopIteration:
                try:
                    error = cls(message)
                except Exception:  # noqa: BLE001 - constructors with other signatures
                    error = None
            raise error if error is not None else SolutionError(name + ": " + message)
        return _wire_decode(reply["ok"], lambda tag, body: Ref({tag: body}))

    def wire_of(value):
        if type(value) is Ref:
            return value.wire
        raise TypeError("only plain values and the solution's own objects can be passed to the solution, "
                        f"not {type(value).__name__}")

    def enc(value):
        return _wire_encode(value, wire_of)

    def plain(ref):
        value = rpc("get", ref.wire)
        if type(value) is Ref:
            kind = value.wire.get("H", [0, "object"])[1]
            give_up("tampered", f"an object of class {kind} from the solution was compared or converted: only "
                    "plain values (numbers, strings, bytes and containers of them) can be judged")
        return value

    class Ref:
        """An object of the solution. Calls, attribute and item reads, iteration, len() and str() are forwarded to
        it (their results are values the solution chooses, like return values); comparisons, truth, hashing and
        arithmetic need its plain value, so they are evaluated here."""

        __slots__ = ("wire",)

        def __init__(self, wire):
            self.wire = wire

        def __call__(self, *args, **kwargs):
            return rpc("call", self.wire, args=[enc(a) for a in args],
                       kwargs=[[k, enc(v)] for k, v in kwargs.items()])

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return rpc("getattr", self.wire, name=name)

        def __iter__(self):
            it = rpc("iter", self.wire)
            return RefIterator(it) if type(it) is Ref else iter(it)

        def __getitem__(self, key):
            return rpc("getitem", self.wire, key=enc(key))

        def __len__(self):
            n = rpc("len", self.wire)
            return n if type(n) is int else give_up("tampered", "len() of a solution object is not an int")

        def __contains__(self, item):
            value = rpc("get", self.wire)
            if type(value) is not Ref:
                return item in value
            return any(x is item or x == item for x in self)  # as Python does for iterables, compared here

        def __str__(self):
            text = rpc("str", self.wire)
            return text if type(text) is str else give_up("tampered", "str() of a solution object is not a str")

        def __repr__(self):
            return f"<solution object {json.dumps(self.wire)}>"

    class RefIterator:
        def __init__(self, ref):
            self.ref = ref

        def __iter__(self):
            return self

        def __next__(self):
            return rpc("next", self.ref.wire)

    def on_plain(fn, reflected=False):
        if reflected:
            return lambda self, other: fn(other, plain(self))
        return lambda self, *other: fn(plain(self), *other)

    for name in ("eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow"):
        setattr(Ref, f"__{name}__", on_plain(getattr(operator, name)))
    for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow"):
        setattr(Ref, f"__r{name}__", on_plain(getattr(operator, name), reflected=True))
    for name, fn in (("hash", hash), ("bool", bool), ("int", int), ("float", float),
                     ("index", operator.index), ("neg", operator.neg), ("pos", operator.pos), ("abs", abs)):
        setattr(Ref, f"__{name}__", on_plain(fn))

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for name in names:
        namespace[name] = Ref({"N": name})
    try:
        exec(compile(test_src, "test.py", "exec"), namespace)  # noqa: S102 - running the test is the judge's job
        verdict = ("pass", "")
    except Unjudgeable:
        verdict = ("gone", "")
    except BaseException as e:  # noqa: BLE001 - AssertionError or the solution's exception: the test failed
        try:
            verdict = ("fail", f"{type(e).__name__}: {e}"[:300])
        except BaseException:  # noqa: BLE001
            verdict = ("fail", type(e).__name__)
    if spoiled:
        verdict = spoiled[0]
    send({"op": "verdict", "verdict": verdict[0], "detail": verdict[1]})


@functools.cache
def _harness(*fns: Any) -> str:
    """Source of ``fns`` to run in a sandbox (the same code the verifier runs here)."""
    return "\n\n".join(textwrap.dedent(inspect.getsource(f)) for f in fns) + "\n\n"


def solution_program(code: str, rfd: int, wfd: int) -> str:
    """The solution's sandbox program: ``code``, then its server of the judge's requests (read on ``rfd``, answered
    on ``wfd``)."""
    return code + "\n\n" + _harness(_wire_encode, _wire_decode, _solution_serve) + (
        f"_solution_serve(globals(), {rfd}, {wfd})\n")


def judge_program(test_src: str, names: list[str], rfd: int, wfd: int) -> str:
    """The judge's sandbox program: run ``test_src`` with ``names`` proxied to the solution, requests on ``wfd``,
    replies on ``rfd``, the verdict last on ``wfd``."""
    return _harness(_wire_encode, _wire_decode, _judge_main) + f"_judge_main({test_src!r}, {names!r}, {rfd}, {wfd})\n"
