import torch

from prunebench.contract.layout import TokenLayout


def layout():
    # BOS | 2 views of 2x3 | proprio | prompt of 6 (template: 2 head, 1 tail) | 4 actions | STOP
    return TokenLayout.build([("a", 2, 3), ("b", 2, 3)], n_proprio=1, n_prompt=6, n_template_head=2,
                             n_template_tail=1, n_actions=4)


def test_spans_and_positions():
    lay = layout()
    assert lay.length == 1 + 12 + 1 + 6 + 4 + 1
    assert lay.views[1].start == 7 and lay.proprio == (13, 14) and lay.prompt == (14, 20)
    assert lay.template == (14, 15, 19) and lay.actions == (20, 24) and lay.stop == 24
    assert lay.grid_of_visual(7) == (1, 0, 1)
    assert lay.row_slots("text").tolist() == [16, 17, 18]
    assert lay.row_slots("last").tolist() == [24]
    assert lay.row_slots("language").tolist() == [0, 14, 15, 16, 17, 18, 19, 24]
    # OFT read-out: last prompt token + all but the last action slot
    assert lay.readout_slots().tolist() == [19, 20, 21, 22]


def test_keep_slots_updates_map_and_readout():
    lay = layout()
    drop = {2, 3, 8}  # visual positions
    slots = torch.tensor([s for s in range(lay.length) if s not in drop])
    lay.keep_slots(slots)
    assert lay.current_length == lay.length - 3
    assert lay.present_visual().tolist() == [0, 3, 4, 5, 6, 8, 9, 10, 11]
    assert lay.n_present_visual(0) == 4 and lay.n_present_visual(1) == 5
    assert lay.readout_slots().tolist() == [16, 17, 18, 19]  # shifted by the 3 removed tokens


def test_readout_fails_when_an_action_position_is_removed():
    lay = layout()
    lay.keep_slots(torch.tensor([s for s in range(lay.length) if s != 21]))
    try:
        lay.readout_slots()
    except RuntimeError as err:
        assert "read-out" in str(err)
    else:
        raise AssertionError("expected an error")
