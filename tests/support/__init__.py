"""Support code for the tests (not tests): tiny models, the loopback Hub server, CLI helpers."""
