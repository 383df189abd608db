"""Deprecated name of ``ds_hylo.exchange`` (kept until every import has moved)."""

from .exchange import Exchange as Communicator, SingleProcess, default_exchange as default_communicator

__all__ = ["Communicator", "SingleProcess", "default_communicator"]
