"""ViQuAE (Lerner et al., SIGIR 2022) as its authors publish and use it: ``relevance`` re-implements the rule of
their code (``meerqat.ir.metrics.find_relevant``) that decides which passages are relevant to a question, from
the answer strings alone. ``docs/viquae.md`` describes the published data layout and the authors' pipeline, with
a source reference for each fact."""
