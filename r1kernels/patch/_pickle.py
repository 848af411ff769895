"""Pickling (torch.save, copy.deepcopy) of modules whose class rk.patch makes at run time. Pickle names a
class by its module and qualified name; a made class carries its base's (patch/layers.py) or R1KRouter's
(patch/deepseek_v3.py), which name another class, so pickle would refuse the module ("not the same
object"). A made class pickles instead as a call that makes (or finds) it again from picklable parts:
make(*args) returns the class; the module's state pickles as any nn.Module's."""
from __future__ import annotations


def reduce_made(obj, protocol: int, make, *args) -> tuple:
    """obj.__reduce_ex__ of a module of a made class: object's reduction with the class made again on load."""
    parts = object.__reduce_ex__(obj, protocol)
    return (new_made, (make, *args)) + tuple(parts[2:])


def new_made(make, *args):
    cls = make(*args)
    return cls.__new__(cls)
