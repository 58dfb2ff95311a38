"""netmeld: combine trained neural networks into one model.

>>> import netmeld
>>> model = netmeld.meld([pets, people], method="infomax", data=unlabeled_images)
>>> netmeld.evaluate(model, (test_images, test_labels))
"""

from netmeld import _deprecated
from netmeld._version import __version__
from netmeld.data import Data, load_data
from netmeld.errors import (
    CheckpointError,
    DataError,
    IncompatibleMembersError,
    LabelError,
    MemberError,
    MethodError,
    ModelFileError,
    NetmeldError,
    RecipeError,
)
from netmeld.evaluate import Report, compare, evaluate
from netmeld.members.bridges import export_onnx, keras_member, keras_members, onnx_member
from netmeld.members.member import Architecture, Member, Preprocessing
from netmeld.methods import fusion, get_method, list_methods, register_method
from netmeld.methods.distill import distill
from netmeld.methods.extend import extend
from netmeld.methods.fusion import fit, hierarchical, multitask, parallel
from netmeld.methods.meld import extract, meld
from netmeld.methods.merge import merge_members, zip_members
from netmeld.model.artifact import load
from netmeld.model.combined import CombinedModel

_deprecated.install()

__all__ = [
    "Architecture",
    "CheckpointError",
    "CombinedModel",
    "Data",
    "DataError",
    "IncompatibleMembersError",
    "LabelError",
    "Member",
    "MemberError",
    "MethodError",
    "ModelFileError",
    "NetmeldError",
    "Preprocessing",
    "RecipeError",
    "Report",
    "__version__",
    "compare",
    "distill",
    "evaluate",
    "export_onnx",
    "extend",
    "extract",
    "fit",
    "fusion",
    "get_method",
    "hierarchical",
    "keras_member",
    "keras_members",
    "list_methods",
    "load",
    "load_data",
    "meld",
    "merge_members",
    "multitask",
    "onnx_member",
    "parallel",
    "register_method",
    "zip_members",
]
