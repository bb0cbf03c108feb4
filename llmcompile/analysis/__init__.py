"""What passes ask about a graph: ``masks`` (is this attention mask causal, windowed?)."""
