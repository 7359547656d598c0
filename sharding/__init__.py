"""Sharding: device meshes, the logical-axis rule table, and sharded train steps."""
