"""JSON form of :class:`storage.model.ParsedMessage` as stored in ``messages.parsed``.

The canonical codec is ``storage.mime``'s (versioned, round-trip exact);
the SQL stores call it through this module so the column format has one
owner.
"""

from storage.mime import parsed_from_json, parsed_to_json

__all__ = ["parsed_from_json", "parsed_to_json"]
