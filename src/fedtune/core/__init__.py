"""Engine-agnostic federated core: named arrays, wire format, selection, aggregation,
and the Strategy / ClientApp contracts that every engine drives."""
