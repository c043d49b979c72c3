"""The codellm Language Server."""
