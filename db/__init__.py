"""Everything about the database: settings, engines, schema, the ops registry,
the writer's client and health checks. Nothing else lives here."""
