"""ewcstab: a reproduction of Kutalev & Lapina (arXiv:2109.10021).

Elastic Weight Consolidation with four weight importances (Fisher, MAS, SI, total
absolute signal), the paper's stabilized penalty, and pruning by weight importance.
"""

__version__ = "0.1.0"
