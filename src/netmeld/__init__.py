"""netmeld: combine trained neural networks into one model.

>>> import netmeld
>>> model = netmeld.meld([pets, people], method="infomax", data=unlabeled_images)
>>> netmeld.evaluate(model, (test_images, test_labels))
"""

from netmeld import _deprecated
from netmeld._version import __version__
from netmeld.cli.inspection import inspect
from netmeld.data import Data, load_data, open_data
from netmeld.errors import (
    CheckpointError,
    DataError,
    ExportError,
    IncompatibleMembersError,
    LabelError,
    MemberError,
    MethodError,
    ModelFileError,
    NetmeldError,
    RecipeError,
    UnderdeterminedFitWarning,
    UntrustedCodeError,
)
from netmeld.evaluate import Report, compare, evaluate
from netmeld.io.checkpoint_merge import merge_weights
from netmeld.members.member import Architecture, Member, Preprocessing
from netmeld.members.trust import trust_builder
from netmeld.methods import fusion, get_method, list_methods, register_method
from netmeld.methods._extract import FeatureCache
from netmeld.methods.distill import distill
from netmeld.methods.extend import extend
from netmeld.methods.fusion.training import train
from netmeld.methods.meld import extract, meld
from netmeld.methods.merge import merge_members, zip_members
from netmeld.methods.statistics import (
    FeatureStatistics,
    feature_statistics,
    statistics_from_features,
)
from netmeld.model.artifact import export, load
from netmeld.model.combined import CombinedModel
from netmeld.predict import Prediction, predict, write_predictions

_deprecated.install()


def __getattr__(name: str) -> object:
    """0.1.0's names that were renamed (``fit``, ``keras_member``, ...): one more release, with
    a ``DeprecationWarning`` naming the new one."""
    return _deprecated.renamed(name)


__all__ = [
    "Architecture",
    "CheckpointError",
    "CombinedModel",
    "Data",
    "DataError",
    "ExportError",
    "FeatureCache",
    "FeatureStatistics",
    "IncompatibleMembersError",
    "LabelError",
    "Member",
    "MemberError",
    "MethodError",
    "ModelFileError",
    "NetmeldError",
    "Prediction",
    "Preprocessing",
    "RecipeError",
    "Report",
    "UnderdeterminedFitWarning",
    "UntrustedCodeError",
    "__version__",
    "compare",
    "distill",
    "evaluate",
    "export",
    "extend",
    "extract",
    "feature_statistics",
    "fusion",
    "get_method",
    "inspect",
    "list_methods",
    "load",
    "load_data",
    "meld",
    "merge_members",
    "merge_weights",
    "open_data",
    "predict",
    "register_method",
    "statistics_from_features",
    "train",
    "trust_builder",
    "write_predictions",
    "zip_members",
]
