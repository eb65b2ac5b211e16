"""The web app: a Gradio page that talks to a running ``citrus-v deploy`` server.

``page`` lays the page out and wires its events to ``handlers``; ``client`` asks the server; ``scan`` reads an
upload (frames, slices, axes, time points, pixel spacing; a zip of DICOM slices or a video as a stack);
``window_menu`` decides when CT windows apply; ``display`` enlarges small pictures and draws the masks;
``answer_chips`` turns each ``[SEG]`` into a coloured chip; ``measurements`` and ``legend`` list each mask;
``downloads`` writes the mask files. A question about a whole volume or clip: ``volume_request`` makes the one
``video_url`` part, ``volume_answer`` decodes the per-frame masks and cuts them for any slice, ``volume_view``
shows them, ``volume_legend`` lists each mask's volume, ``planes_picture`` draws the three planes.
"""
