"""Knowledge distillation: a small student learns from a larger teacher's outputs (Hinton et al. 2015), through the
one training loop. `losses` holds the divergences (soft-target KL, reverse KL, generalised JSD, hidden-state
cosine/MSE), `objective` turns them into loop objectives (teacher on the fly or cached, GKD on-policy samples),
`student` builds students from a teacher (every other layer, as DistilBERT), `encoder` distils sentence embeddings.
"""
