import pytest

from irpo_pl.datamodule import IRPODataModule
from irpo_pl.objectives import IRPO


def test_offline_rows_with_an_empty_completion_are_refused_naming_row_and_field(tmp_path):
    rows = [{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2]}, {"prompt_ids": [1], "chosen_ids": [6, 2], "rejected_ids": []}]
    with pytest.raises(ValueError, match=r"rows\[1\]: rejected_ids is empty"):
        IRPODataModule.from_rows(rows, batch_size=4, objective=IRPO(), out_dir=tmp_path)
