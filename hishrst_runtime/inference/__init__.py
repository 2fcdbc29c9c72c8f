"""One slide's inference: preparation, work units, reading tiles, encoder and head stages (query points for spot
bundles; the bins of a token lattice for sub-spot bundles: ``bins``, ``bin_stages``). Depends on core, bundle,
slides, output, backends."""
