"""The order-loss recipes of ``narrows interactions train``: a named recipe, or a custom loss."""

from __future__ import annotations

from typing import Any

from narrows.errors import UserError


def resolve_recipe(options: Any) -> tuple[str, float, float] | None:
    """``(kind, r1, r2)`` of ``options`` (an :class:`~narrows.interactions.options.
    OrderLossOptions`): its ``recipe`` (see :data:`~narrows.interactions.order_loss.RECIPES`),
    or with ``recipe="custom"`` its ``loss``, ``r1`` and ``r2``; ``None`` for ``normal`` (no
    order loss). A value that contradicts the recipe, or a custom recipe missing one, is a
    :class:`UserError` naming the parameter in backticks."""
    from narrows.interactions.order_loss import RECIPES

    given = {"loss": options.loss, "r1": options.r1, "r2": options.r2}
    if options.recipe == "custom":
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UserError(f"`recipe` custom needs `{missing[0]}`",
                            "give `loss`, `r1` and `r2`, or a `recipe` (normal, high, mid, low)")
        return options.loss, float(options.r1), float(options.r2)
    recipe = RECIPES[options.recipe]
    if recipe is None:
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise UserError(f"`recipe` normal trains without an order loss but `{extra[0]}` "
                            "was given", f"drop `{extra[0]}` or use `recipe` custom")
        return None
    for (name, value), wanted in zip(given.items(), recipe, strict=True):
        if value is not None and value != wanted:
            raise UserError(f"`{name}` {value} contradicts `recipe` {options.recipe} "
                            f"(loss {recipe[0]}, r1 {recipe[1]}, r2 {recipe[2]})",
                            f"drop `{name}`, or use `recipe` custom")
    return recipe


def recipe_name(options: Any, recipe: tuple[str, float, float] | None) -> str:
    """A run's name for ``options``' recipe: the recipe, or ``loss_r1_r2`` for a custom one
    (``recipe``: :func:`resolve_recipe`'s result)."""
    if options.recipe != "custom" or recipe is None:
        return options.recipe
    kind, r1, r2 = recipe
    return f"{kind}_{r1:g}_{r2:g}"
