"""Tests of server/engine: scheduler and pool bookkeeping exactly, the PEFT oracle, sampling."""
