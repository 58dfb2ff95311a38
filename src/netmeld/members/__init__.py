"""Members: trained classifiers with their labels, preprocessing and architecture; their graph
(head and trunk discovery); and the Keras / ONNX bridges that make members of other formats.

The names of 0.1.0's ``netmeld.members`` module are all here, so old imports keep working."""

from netmeld.members.checkpoint import load_into, read_state_dict
from netmeld.members.member import Architecture, Member, Preprocessing, read_labels

__all__ = ["Architecture", "Member", "Preprocessing", "load_into", "read_labels", "read_state_dict"]
