"""Making models write: batched KV-cached sampling (:mod:`~lrkd.generation.sampling`), pass-rate
counts over K samples per problem (:mod:`~lrkd.generation.pass_rates`) and on-policy training
batches (:mod:`~lrkd.generation.on_policy`). Neither data nor model: it runs models on data."""
