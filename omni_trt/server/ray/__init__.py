"""`omni serve --replicas N`: the same HTTP API on Ray Serve, one model replica per GPU.

- replica.py: `ModelReplica`, a Serve deployment holding the local serving object (runtime,
  admission, scheduler, streaming) and answering the contract's calls without HTTP; the metrics hub.
- client.py: `RemoteServing`, the contract's `Serving` over a handle to the replicas: it validates
  nothing itself, so every rule and message is the replicas' own.
- deploy.py: the deployment options, the Serve applications (replicas alone, or behind an ingress
  for a cluster's own HTTP proxy), and `omni serve --replicas`'s launcher.

Only imported with --replicas (or by Ray itself): without it, Ray is never imported.
"""
