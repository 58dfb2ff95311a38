"""Members: trained classifiers with their labels, preprocessing and architecture; their graph
(head and trunk discovery); and the Keras / ONNX bridges that make members of other formats."""

from netmeld.members.member import Architecture, Member, Preprocessing, read_labels

__all__ = ["Architecture", "Member", "Preprocessing", "read_labels"]
