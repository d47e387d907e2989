"""A researcher's own package, outside bcdcore: a model with blocks, a dataset, a solver and a stopper, named
in recipes by dotted path ("mypkg.nets:build"). See docs/plugins.md."""
