"""Tally spend control for the LiteLLM proxy.

In the proxy's ``config.yaml``::

    general_settings:
      master_key: os.environ/LITELLM_MASTER_KEY
      custom_auth: tally_litellm.auth
    litellm_settings:
      callbacks: tally_litellm.handler

``auth`` lets the proxy's users present their Tally API keys; ``handler``
reserves each call's estimated cost before it runs, reports its usage after,
and releases the reserve of a call that failed. See README.md.
"""

from .hooks import TallyHandler, auth, handler

__all__ = ["TallyHandler", "auth", "handler"]
__version__ = "0.1.0"
