"""Engines move arrays between a Strategy and ClientApps; they hold no algorithm logic."""
