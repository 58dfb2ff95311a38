"""The one combined model type, the heads on top of its members, and its saved folder."""
