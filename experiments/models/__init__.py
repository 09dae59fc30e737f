# A package so gin's Python-path reader (gin.resource_reader) resolves include 'experiments/...'.
