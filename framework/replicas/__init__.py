"""Data-parallel replicas of the service on Ray Serve (``tokenmill serve --replicas N``; extra ``tokenmill[ray]``).

``prefix.py`` turns a request body into prefix keys, ``forward.py`` runs a forwarded HTTP request through
the ordinary tokenmill app inside a replica, ``router.py`` is the Ray Serve request router that prefers
the replica holding the request's prefix, ``deployments.py`` the two deployments (ingress, engine
replica) and ``launch.py`` what the command line starts. See docs/distributed.md.
"""
