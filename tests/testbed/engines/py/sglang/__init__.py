"""Fake sglang package (see fakeengine.sglang)."""
