"""Analysis of finished runs: results tables from run folders (``results``), dictionary
geometry (``geometry``) and plots (``plots``)."""
