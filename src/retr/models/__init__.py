"""Model registry: name -> (config class, model class)."""
