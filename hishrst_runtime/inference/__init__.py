"""One slide's inference: preparation, work units, reading tiles, encoder and head stages. Depends on core, bundle, slides, output, backends."""
