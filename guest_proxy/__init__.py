"""/guest/<Method>: forwards guest API calls to the agent inside a VM."""
